//! `hatchery check`: everything a worker needs before it takes jobs, checked the way an
//! administrator would by hand, as one table; exits 1 when anything is wrong.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use super::ConfigArgs;
use crate::config::Config;
use crate::fleet::Names;
use crate::fleet::link::Endpoint;
use crate::hypervisor::{Hypervisor, Op};

/// One line of the report.
struct Row {
    check: &'static str,
    target: String,
    ok: bool,
    detail: String,
}

pub fn main(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let rows = runtime.block_on(run(&config));

    let width = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<10} {:<width$} {:<6} DETAIL",
        "CHECK", "TARGET", "STATUS"
    );
    for row in &rows {
        let status = if row.ok { "ok" } else { "FAILED" };
        println!(
            "{:<10} {:<width$} {status:<6} {}",
            row.check, row.target, row.detail
        );
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        println!("{failed} of {} checks failed", rows.len());
        return Ok(ExitCode::FAILURE);
    }
    println!("all {} checks passed", rows.len());
    Ok(ExitCode::SUCCESS)
}

async fn run(config: &Config) -> Vec<Row> {
    let mut rows = broker(config).await;
    for (name, hv) in &config.hypervisors {
        rows.extend(hypervisor(name, hv).await);
    }
    if config.hypervisors.is_empty() {
        rows.push(Row {
            check: "hypervisor",
            target: "(none)".into(),
            ok: true,
            detail: "none configured: jobs must give libvirt URIs".into(),
        });
    }
    rows.extend(secrets(config));
    rows
}

async fn broker(config: &Config) -> Vec<Row> {
    let url = crate::fleet::redact_url(&config.broker.url);
    let endpoint = Endpoint::new(&config.broker.url, config.broker.tls_ca.clone());
    let conn = match endpoint.connect("hatchery check").await {
        Ok(conn) => conn,
        Err(e) => {
            let detail = crate::pipeline::chain(&e);
            return vec![Row {
                check: "broker",
                target: url,
                ok: false,
                detail,
            }];
        }
    };
    let mut rows = vec![Row {
        check: "broker",
        target: url,
        ok: true,
        detail: "connected".into(),
    }];

    // Passive declarations fail (and close the channel) when the object is missing, so each
    // check gets a channel of its own.
    let names = Names::new(&config.broker.prefix);
    let passive = |queue: bool, name: String| {
        let conn = &conn;
        async move {
            let channel = conn.create_channel().await?;
            if queue {
                let opts = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(name.as_str().into(), opts, FieldTable::default())
                    .await?;
            } else {
                let opts = ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let kind = lapin::ExchangeKind::Topic;
                channel
                    .exchange_declare(name.as_str().into(), kind, opts, FieldTable::default())
                    .await?;
            }
            let _ = channel.close(200, "check done".into()).await;
            Ok::<(), lapin::Error>(())
        }
    };
    let objects = [
        (false, names.jobs_exchange.clone()),
        (true, names.jobs_queue.clone()),
        (false, names.events_exchange.clone()),
        (false, names.dead_exchange.clone()),
        (true, names.dead_queue.clone()),
    ];
    for (queue, name) in objects {
        let what = if queue { "queue" } else { "exchange" };
        let (ok, detail) = match passive(queue, name.clone()).await {
            Ok(()) => (true, format!("{what} present")),
            Err(e) => (false, format!("{what} missing or unusable: {e}")),
        };
        rows.push(Row {
            check: "topology",
            target: name,
            ok,
            detail,
        });
    }
    let _ = conn.close(200, "check done".into()).await;
    rows
}

async fn hypervisor(name: &str, cfg: &crate::config::HypervisorConfig) -> Vec<Row> {
    let hv = Arc::new(Hypervisor::new(&cfg.uri));
    let target = format!("{name} ({})", cfg.uri);
    let version = hv
        .call(
            Op::Connect {
                uri: cfg.uri.clone(),
            },
            |conn| {
                let lib = conn.lib_version()?;
                let host = conn.hostname()?;
                Ok((lib, host))
            },
        )
        .await;
    let (lib, host) = match version {
        Ok(found) => found,
        Err(e) => {
            let detail = crate::pipeline::chain(&e);
            return vec![Row {
                check: "hypervisor",
                target,
                ok: false,
                detail,
            }];
        }
    };
    let v = format!("{}.{}.{}", lib / 1_000_000, lib / 1000 % 1000, lib % 1000);
    let mut rows = vec![Row {
        check: "hypervisor",
        target,
        ok: true,
        detail: format!("libvirt {v} on {host}"),
    }];

    if let Some(pool) = &cfg.pool {
        let p = pool.clone();
        let found = hv
            .call(Op::LookupPool { pool: pool.clone() }, move |conn| {
                let pool = conn.lookup_storage_pool_by_name(&p)?;
                Ok((pool.is_active()?, pool.list_volumes()?))
            })
            .await;
        let (ok, detail) = match &found {
            Ok((true, _)) => (true, "active".to_owned()),
            Ok((false, _)) => (false, "defined but not active".to_owned()),
            Err(e) => (false, crate::pipeline::chain(e)),
        };
        rows.push(Row {
            check: "pool",
            target: format!("{name}/{pool}"),
            ok,
            detail,
        });
        let volumes = found.map(|(_, v)| v).unwrap_or_default();
        for base in &cfg.bases {
            let ok = volumes.contains(base);
            let detail = if ok { "present" } else { "not in the pool" }.to_owned();
            rows.push(Row {
                check: "base",
                target: format!("{name}/{pool}/{base}"),
                ok,
                detail,
            });
        }
    }
    if let Some(network) = &cfg.network {
        let n = network.clone();
        let found = hv
            .call(
                Op::ReadLeases {
                    network: network.clone(),
                },
                move |conn| conn.lookup_network_by_name(&n)?.is_active(),
            )
            .await;
        let (ok, detail) = match found {
            Ok(true) => (true, "active".to_owned()),
            Ok(false) => (false, "defined but not active".to_owned()),
            Err(e) => (false, crate::pipeline::chain(&e)),
        };
        rows.push(Row {
            check: "network",
            target: format!("{name}/{network}"),
            ok,
            detail,
        });
    }
    rows
}

fn secrets(config: &Config) -> Vec<Row> {
    let Some(dir) = &config.secrets.key_dir else {
        return Vec::new();
    };
    let target = dir.display().to_string();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return vec![Row {
                check: "secrets",
                target,
                ok: false,
                detail: e.to_string(),
            }];
        }
    };
    let mut rows = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        // Read, never print: only whether the key is readable and looks like a private key.
        let (ok, detail) = match std::fs::read_to_string(&path) {
            Ok(text) if text.contains("PRIVATE KEY") => (true, "readable private key".to_owned()),
            Ok(_) => (false, "readable, but not a private key".to_owned()),
            Err(e) => (false, e.to_string()),
        };
        rows.push(Row {
            check: "secret",
            target: path.display().to_string(),
            ok,
            detail,
        });
    }
    if rows.is_empty() {
        rows.push(Row {
            check: "secrets",
            target,
            ok: true,
            detail: "no keys".into(),
        });
    }
    rows
}
