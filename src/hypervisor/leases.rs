//! DHCP leases of a libvirt network, read with `virNetworkGetDHCPLeases`, which the `virt`
//! crate does not wrap.

use std::ffi::{CStr, CString, c_char};

use virt::network::Network;
use virt::sys;

/// One lease as libvirt's dnsmasq recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub ip: String,
    /// When the lease runs out, in seconds since the epoch.
    pub expiry: i64,
}

/// The leases `network` holds for `mac`.
pub fn for_mac(network: &Network, mac: &str) -> Result<Vec<Lease>, virt::error::Error> {
    let mac = CString::new(mac).map_err(|_| nul_in_mac())?;
    let mut array: *mut sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();

    // SAFETY: the network handle is live for the call; on success libvirt hands over an array
    // of `count` leases that we own and free below, each exactly once.
    let count =
        unsafe { sys::virNetworkGetDHCPLeases(network.as_ptr(), mac.as_ptr(), &mut array, 0) };
    if count < 0 {
        return Err(virt::error::Error::last_error());
    }

    let mut leases = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        // SAFETY: `i` is below the count libvirt returned; every entry is a valid lease whose
        // strings are NUL-terminated or null.
        unsafe {
            let lease = *array.add(i);
            leases.push(Lease {
                mac: string((*lease).mac),
                ip: string((*lease).ipaddr),
                expiry: (*lease).expirytime,
            });
            sys::virNetworkDHCPLeaseFree(lease);
        }
    }
    if !array.is_null() {
        // SAFETY: the array itself was allocated by libvirt with malloc.
        unsafe { libc_free(array.cast()) };
    }
    Ok(leases)
}

unsafe extern "C" {
    #[link_name = "free"]
    fn libc_free(ptr: *mut std::ffi::c_void);
}

/// # Safety
/// `ptr` is null or points to a NUL-terminated string.
unsafe fn string(ptr: *const c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

fn nul_in_mac() -> virt::error::Error {
    // Validation rejects such MACs long before; this keeps the function total.
    virt::error::Error::last_error()
}

/// The lease time a network's DHCP server grants, in seconds, from the network's XML; `None`
/// when the XML does not set one.
pub fn lease_secs(network_xml: &str) -> Option<i64> {
    let doc = roxmltree::Document::parse(network_xml).ok()?;
    let lease = doc.descendants().find(|n| n.has_tag_name("lease"))?;
    let value: i64 = lease.attribute("expiry")?.parse().ok()?;
    let unit = match lease.attribute("unit").unwrap_or("minutes") {
        "seconds" => 1,
        "hours" => 3600,
        _ => 60,
    };
    Some(value * unit)
}
