//! A local login user whose password is recognisable and new in every test process, for tests
//! that search logs and events for it. Made the way `sshd.rs` makes its users (needs root), and
//! allowed to sudo after giving the password.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use uuid::Uuid;

pub const SECRET_USER: &str = "hatchery-secret";
const SUDOERS_FILE: &str = "/etc/sudoers.d/hatchery-secret-tests";

/// [`SECRET_USER`]'s password, `S3cr3t-pw-<uuid>`, set on first call.
pub fn password() -> &'static str {
    static PASSWORD: OnceLock<String> = OnceLock::new();
    PASSWORD.get_or_init(|| {
        let password = format!("S3cr3t-pw-{}", Uuid::new_v4());
        create_user(&password);
        password
    })
}

fn create_user(password: &str) {
    let status = Command::new("useradd")
        .args(["--create-home", "--shell", "/bin/sh", SECRET_USER])
        .stderr(Stdio::null())
        .status()
        .expect("run useradd (package passwd)");
    // 9: the user exists already, from an earlier run; its password is replaced below.
    assert!(
        status.success() || status.code() == Some(9),
        "useradd: {status}"
    );

    let mut chpasswd = Command::new("chpasswd")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let line = format!("{SECRET_USER}:{password}\n");
    chpasswd
        .stdin
        .take()
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
    assert!(chpasswd.wait().unwrap().success(), "chpasswd failed");

    let staging = format!("{SUDOERS_FILE}.{}", std::process::id());
    fs::write(&staging, format!("{SECRET_USER} ALL=(ALL:ALL) ALL\n")).unwrap();
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o440)).unwrap();
    fs::rename(&staging, SUDOERS_FILE).unwrap();
}
