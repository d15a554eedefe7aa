//! Stage 3: learn the guest's address, from libvirt's DHCP leases, the guest agent, the ARP
//! table, or the job itself.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tracing::{debug, info, trace};
use virt::sys;

use super::{JobRun, Refusal, Stage, StageError, StageKind};
use crate::hypervisor::{Op, leases};
use crate::job::{AddressSource, NicAttach};
use crate::settings::Settings;

pub struct Address;

/// libvirt's dnsmasq lease time when the network does not set one.
const DEFAULT_LEASE_SECS: i64 = 3600;

/// Clock skew tolerated between worker and hypervisor when judging a lease's age.
const LEASE_SKEW_SECS: i64 = 2;

impl Stage for Address {
    const KIND: StageKind = StageKind::Address;

    async fn run(cx: &mut JobRun) -> Result<(), StageError> {
        let spec = cx.spec();
        let port = spec.finish.as_ref().and_then(|f| f.port);
        let source = spec.address.clone();
        if let AddressSource::Static { ip, port: given } = source {
            found(cx, SocketAddr::new(ip, port.unwrap_or(given)));
            return Ok(());
        }

        let mac = cx.facts.macs.first().cloned().unwrap_or_else(|| cx.mac(0));
        let network = match (&source, &spec.vm.nics[0].attach) {
            (AddressSource::Lease, NicAttach::Network { network }) => Some(network.clone()),
            (AddressSource::Lease, NicAttach::Bridge { .. }) => {
                return Err(Refusal::LeaseNeedsNetwork.into());
            }
            _ => None,
        };
        let lease_secs = match &network {
            Some(network) => lease_duration(cx, network).await?,
            None => DEFAULT_LEASE_SECS,
        };

        // Poll: a lease appears a few seconds after boot and should be noticed at once.
        let started = tokio::time::Instant::now();
        loop {
            let attempt = lookup(cx, &source, network.as_deref(), &mac, lease_secs).await;
            match attempt {
                Ok(Some(ip)) => {
                    let port = port.unwrap_or(22);
                    found(cx, SocketAddr::new(ip, port));
                    return Ok(());
                }
                Ok(None) => trace!(mac = %mac, "no address yet"),
                Err(e) if e.is_transient() || matches!(source, AddressSource::Agent) => {
                    // The agent answers only once the guest has booted far enough.
                    debug!(mac = %mac, error = %e, "address lookup failed; polling on");
                }
                Err(e) => return Err(e.into()),
            }
            if tokio::time::Instant::now() >= cx.deadline {
                return Err(StageError::NoAddress {
                    mac,
                    after: started.elapsed(),
                });
            }
            tokio::select! {
                () = tokio::time::sleep(cx.settings.address_poll) => {}
                () = cx.cancel.cancelled() => return Err(StageError::Cancelled),
            }
        }
    }

    async fn undo(_cx: &JobRun) -> Result<(), StageError> {
        // Learning an address makes nothing that needs removing.
        Ok(())
    }

    fn default_timeout(settings: &Settings) -> Duration {
        settings.timeouts.address
    }
}

fn found(cx: &mut JobRun, addr: SocketAddr) {
    info!(ip = %addr.ip(), port = addr.port(), "guest address known");
    tracing::Span::current().record("ip", tracing::field::display(addr.ip()));
    cx.facts.address = Some(addr);
}

/// One lookup of the guest's address through `source`; `None` when there is none yet.
async fn lookup(
    cx: &JobRun,
    source: &AddressSource,
    network: Option<&str>,
    mac: &str,
    lease_secs: i64,
) -> Result<Option<IpAddr>, crate::hypervisor::LibvirtError> {
    let name = cx.job.vm_name().to_owned();
    let mac = mac.to_owned();
    let booted = cx.facts.started_at.unwrap_or(0);

    if let Some(network) = network {
        let net = network.to_owned();
        let m = mac.clone();
        let op = Op::ReadLeases {
            network: network.to_owned(),
        };
        let leases = cx
            .hv
            .call(op, move |conn| {
                leases::for_mac(&conn.lookup_network_by_name(&net)?, &m)
            })
            .await;
        match leases {
            Ok(leases) => {
                // A lease granted before this boot belongs to an earlier guest with this MAC.
                let fresh = leases
                    .iter()
                    .filter(|l| l.expiry - lease_secs >= booted - LEASE_SKEW_SECS)
                    .filter_map(|l| l.ip.parse().ok());
                return Ok(pick(fresh));
            }
            // The test driver has no lease list; the domain's own view of its leases follows.
            Err(e) if e.is_unsupported() => {}
            Err(e) => return Err(e),
        }
    }

    let src = match source {
        AddressSource::Agent => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
        AddressSource::Arp => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
        _ => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
    };
    let op = Op::ReadAddresses { name: name.clone() };
    let ifaces = cx
        .hv
        .call(op, move |conn| {
            conn.lookup_domain_by_name(&name)?
                .interface_addresses(src, 0)
        })
        .await?;
    let addrs = ifaces
        .iter()
        .filter(|i| {
            i.hwaddr
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(&mac))
        })
        .flat_map(|i| i.addrs.iter())
        .filter_map(|a| a.addr.parse().ok());
    Ok(pick(addrs))
}

/// The first IPv4 address, else the first IPv6 one that is not loopback.
fn pick(addrs: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
    let all: Vec<IpAddr> = addrs.collect();
    let v4 = all.iter().find(|ip| ip.is_ipv4()).copied();
    v4.or_else(|| all.iter().find(|ip| !ip.is_loopback()).copied())
}

/// The lease time of `network`'s DHCP server, from its XML.
async fn lease_duration(cx: &JobRun, network: &str) -> Result<i64, StageError> {
    let net = network.to_owned();
    let op = Op::ReadLeases {
        network: network.to_owned(),
    };
    let xml = cx
        .hv
        .call(op, move |conn| {
            conn.lookup_network_by_name(&net)?.xml_desc(0)
        })
        .await?;
    Ok(leases::lease_secs(&xml).unwrap_or(DEFAULT_LEASE_SECS))
}
