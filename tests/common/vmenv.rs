//! The real-VM environment of `tests/vm/env.sh`: a network namespace with its own libvirtd,
//! DHCP network, storage pool and guest image. Shared by the tests of one process and torn
//! down when the last of them lets go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// The environment's facts, from the env file `env.sh up` writes.
#[derive(Debug)]
pub struct VmEnv {
    vars: HashMap<String, String>,
}

/// Holds the environment up while alive.
pub struct VmEnvGuard {
    pub env: Arc<VmEnv>,
}

static USERS: Mutex<(usize, Option<Arc<VmEnv>>)> = Mutex::new((0, None));

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/env.sh")
}

impl VmEnv {
    /// Brings the environment up (or joins it, when another test of this process already did).
    pub fn acquire() -> VmEnvGuard {
        let mut users = USERS.lock().unwrap_or_else(|p| p.into_inner());
        if users.1.is_none() {
            let out = Command::new(script())
                .arg("up")
                .output()
                .expect("run tests/vm/env.sh up");
            assert!(
                out.status.success(),
                "env.sh up failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = String::from_utf8(out.stdout).expect("utf-8 path");
            let text = std::fs::read_to_string(path.trim()).expect("env file");
            let vars = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            users.1 = Some(Arc::new(VmEnv { vars }));
        }
        users.0 += 1;
        VmEnvGuard {
            env: Arc::clone(users.1.as_ref().expect("set above")),
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("env file lacks {key}"))
    }

    /// Runs `program` with `args` inside the namespace, where the guests are reachable.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", self.get("NETNS"), program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    pub fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("virsh")
            .args(["-q", "-c", self.get("LIBVIRT_URI")])
            .args(args)
            .output()
            .expect("virsh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for VmEnvGuard {
    fn drop(&mut self) {
        let mut users = USERS.lock().unwrap_or_else(|p| p.into_inner());
        users.0 -= 1;
        if users.0 == 0 {
            users.1 = None;
            let _ = Command::new(script()).arg("down").output();
        }
    }
}
