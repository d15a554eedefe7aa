//! A private fake hypervisor per test: libvirt's test driver with a node description in a
//! temporary directory, so tests run in parallel without sharing state.

use std::path::PathBuf;

use tempfile::TempDir;

/// The storage pool every test host has, and the base volume in it.
pub const POOL: &str = "pool";
pub const BASE: &str = "base.qcow2";
/// The base's virtual size.
pub const BASE_GIB: u64 = 4;
/// A network whose made-up leases are loopback addresses.
pub const NET: &str = "loopnet";
/// A network whose made-up leases are TEST-NET-1 addresses nothing may connect to.
pub const FAR_NET: &str = "farnet";

pub struct TestHost {
    pub dir: TempDir,
    pub uri: String,
}

impl TestHost {
    pub fn new() -> Self {
        Self::with_volumes("")
    }

    /// A host whose base is 16 MiB, for tests that make more overlays than the test driver's
    /// fixed 100 GiB pool holds at the usual base size.
    pub fn small() -> Self {
        Self::build("", "<capacity unit='MiB'>16</capacity>")
    }

    /// A host whose pool also holds the given `<volume>` elements.
    pub fn with_volumes(extra: &str) -> Self {
        Self::build(
            extra,
            &format!("<capacity unit='GiB'>{BASE_GIB}</capacity>"),
        )
    }

    fn build(extra: &str, base_capacity: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pool_dir = dir.path().join("pool");
        std::fs::create_dir(&pool_dir).expect("pool dir");
        let node = format!(
            "<node>
  <network><name>{NET}</name><bridge name='tloop0'/>
    <ip address='127.0.0.1' netmask='255.0.0.0'>
      <dhcp><range start='127.0.0.1' end='127.0.0.1'/></dhcp></ip></network>
  <network><name>{FAR_NET}</name><bridge name='tfar0'/>
    <ip address='192.0.2.1' netmask='255.255.255.0'>
      <dhcp><range start='192.0.2.10' end='192.0.2.20'/></dhcp></ip></network>
  <pool type='dir'><name>{POOL}</name><target><path>{pool}</path></target>
    <volume type='file'><name>{BASE}</name>{base_capacity}
      <target><format type='qcow2'/></target></volume>
    {extra}
  </pool>
</node>",
            pool = pool_dir.display(),
        );
        let path = dir.path().join("node.xml");
        std::fs::write(&path, node).expect("node xml");
        let uri = format!("test://{}", path.display());
        Self { dir, uri }
    }

    /// Where a volume of the pool would be on disk; the test driver itself writes nothing.
    pub fn pool_path(&self, volume: &str) -> PathBuf {
        self.dir.path().join("pool").join(volume)
    }
}
