//! Reading the facts hatchery needs out of the XML libvirt returns.

/// What a storage volume's XML says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFacts {
    pub path: String,
    pub capacity_bytes: u64,
    pub format: String,
    /// The volume's own backing file, when it has one.
    pub backing_path: Option<String>,
    pub backing_format: Option<String>,
    /// qcow2's external data file, when it has one.
    pub has_data_file: bool,
    /// Modification time as libvirt reports it (`seconds.nanoseconds`), when it does.
    pub mtime: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("libvirt returned XML that does not parse")]
    NotXml(#[source] roxmltree::Error),
    #[error("libvirt's XML lacks `{0}`")]
    Missing(&'static str),
}

fn find<'a, 'i>(parent: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    parent.children().find(|n| n.tag_name().name() == name)
}

pub fn volume(xml: &str) -> Result<VolumeFacts, InspectError> {
    let doc = roxmltree::Document::parse(xml).map_err(InspectError::NotXml)?;
    let root = doc.root_element();

    let capacity = find(root, "capacity")
        .and_then(|n| n.text())
        .and_then(|t| t.trim().parse().ok())
        .ok_or(InspectError::Missing("capacity"))?;
    let target = find(root, "target").ok_or(InspectError::Missing("target"))?;
    let path = find(target, "path")
        .and_then(|n| n.text())
        .unwrap_or_default()
        .to_owned();
    let format = find(target, "format")
        .and_then(|n| n.attribute("type"))
        .unwrap_or("raw")
        .to_owned();
    let mtime = find(target, "timestamps")
        .and_then(|t| find(t, "mtime"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_owned());

    let backing = find(root, "backingStore");
    let backing_path = backing.and_then(|b| find(b, "path")).and_then(|n| n.text());
    let backing_format = backing
        .and_then(|b| find(b, "format"))
        .and_then(|n| n.attribute("type"));
    let has_data_file = root
        .descendants()
        .any(|n| n.tag_name().name() == "dataStore");

    Ok(VolumeFacts {
        path,
        capacity_bytes: capacity,
        format,
        backing_path: backing_path
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty()),
        backing_format: backing_format.map(str::to_owned),
        has_data_file,
        mtime,
    })
}

/// The MAC addresses of a domain's interfaces, in order, and the source file of its first disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainFacts {
    pub macs: Vec<String>,
    pub networks: Vec<Option<String>>,
    pub disk_path: Option<String>,
}

pub fn domain(xml: &str) -> Result<DomainFacts, InspectError> {
    let doc = roxmltree::Document::parse(xml).map_err(InspectError::NotXml)?;
    let devices = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("devices"))
        .ok_or(InspectError::Missing("devices"))?;

    let mut macs = Vec::new();
    let mut networks = Vec::new();
    for iface in devices.children().filter(|n| n.has_tag_name("interface")) {
        let child = |name: &str| iface.children().find(|n| n.has_tag_name(name));
        if let Some(mac) = child("mac").and_then(|n| n.attribute("address")) {
            macs.push(mac.to_ascii_lowercase());
            networks.push(
                child("source")
                    .and_then(|n| n.attribute("network"))
                    .map(str::to_owned),
            );
        }
    }
    let disk_path = devices
        .children()
        .filter(|n| n.has_tag_name("disk"))
        .find_map(|d| d.children().find(|n| n.has_tag_name("source")))
        .and_then(|s| s.attribute("file"))
        .map(str::to_owned);

    Ok(DomainFacts {
        macs,
        networks,
        disk_path,
    })
}
