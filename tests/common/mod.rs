//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod built_xml;
pub mod capture;
pub mod fleet;
pub mod fleet_vm;
pub mod hostile;
pub mod jobs;
pub mod junk;
pub mod libvirtd;
pub mod load;
pub mod ns_sshd;
pub mod pipeline;
pub mod run_finish;
pub mod secret_user;
pub mod sshd;
pub mod testdriver;
pub mod tls;
pub mod vm_jobs;
pub mod vmenv;

use std::time::{Duration, Instant};

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
