//! The domain and overlay volume XML a job turns into, built from the same typed values the
//! overlay and domain stages use, and the checks that prove a document holds only what its
//! builder meant: the same element tree whatever the values, and every value intact.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use roxmltree::{Document, Node};
use uuid::Uuid;

use hatchery::hypervisor::Hypervisor;
use hatchery::hypervisor::metadata::{self, JobMetadata};
use hatchery::hypervisor::xml::{self, DomainSpec, Element, KernelXml, NicXml};
use hatchery::job::{BaseLocation, BatchRef, ConsoleKind, DomainType, Job, NicAttach};
use hatchery::settings::Settings;
use hatchery::stages::JobRun;

/// Where the made-up hypervisor keeps its pool's volumes.
pub const POOL_DIR: &str = "/var/lib/hatchery/pool";
/// The made-up worker's `serial_log_dir`, so that the `<log>` element is built too.
pub const SERIAL_DIR: &str = "/var/log/hatchery";
/// The base's size when the job gives no `disk_gib`.
pub const BASE_BYTES: u64 = 4 << 30;

/// Every value the two documents are made of, already resolved as the stages resolve them.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub job_id: Uuid,
    pub name: String,
    pub domain_type: DomainType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub batch: Option<BatchRef>,
    pub overlay_pool: String,
    pub overlay_volume: String,
    pub overlay_path: String,
    pub capacity_bytes: u64,
    pub base_path: String,
    pub base_sha256: Option<String>,
    pub nics: Vec<NicXml>,
    pub console: ConsoleKind,
    pub listen: IpAddr,
    pub kernel: Option<KernelXml>,
    pub serial_log: Option<String>,
}

impl Inputs {
    /// Resolves `job` the way the overlay stage and the domain stage's `define` do, on a
    /// hypervisor whose pools live under [`POOL_DIR`]. `job` must be a provisioning job.
    pub fn from_job(job: &Job) -> Self {
        let settings = Settings {
            serial_log_dir: Some(SERIAL_DIR.to_owned()),
            ..Settings::default()
        };
        let cx = JobRun::new(
            Arc::new(job.clone()),
            Arc::new(Hypervisor::new("test:///default")),
            Arc::new(settings),
            1,
        );
        let vm = &cx.spec().vm;
        let (base_pool, base_path) = match &vm.base.location {
            BaseLocation::Volume { pool, volume } => (pool.clone(), format!("{POOL_DIR}/{volume}")),
            BaseLocation::Path { path } => ("default".to_owned(), path.clone()),
        };
        let overlay_volume = cx.overlay_name();
        let console = vm.console.as_ref();

        Self {
            job_id: job.id,
            name: job.vm_name().to_owned(),
            domain_type: vm.domain_type,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            batch: job.batch.clone(),
            overlay_pool: vm.pool.clone().unwrap_or(base_pool),
            overlay_path: format!("{POOL_DIR}/{overlay_volume}"),
            overlay_volume,
            capacity_bytes: vm.disk_gib.map_or(BASE_BYTES, |gib| gib << 30),
            base_path,
            base_sha256: vm.base.sha256.clone(),
            nics: (vm.nics.iter().enumerate())
                .map(|(i, nic)| NicXml {
                    attach: nic.attach.clone(),
                    model: nic.model.clone(),
                    mac: cx.mac(i),
                })
                .collect(),
            console: console.map_or(ConsoleKind::Vnc, |c| c.kind),
            listen: console
                .and_then(|c| c.listen)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            kernel: vm.boot.as_ref().map(|b| KernelXml {
                kernel: b.kernel.clone(),
                initrd: b.initrd.clone(),
                cmdline: b.cmdline.clone(),
            }),
            serial_log: (cx.settings.serial_log_dir.as_ref())
                .map(|d| format!("{d}/{}-serial.log", job.vm_name())),
        }
    }

    /// The same inputs with every string value replaced by `f` of it; the element tree of the
    /// documents must not change.
    pub fn map_strings(&self, f: impl Fn(&str) -> String) -> Self {
        let mut twin = self.clone();
        for s in [
            &mut twin.name,
            &mut twin.overlay_pool,
            &mut twin.overlay_volume,
            &mut twin.overlay_path,
            &mut twin.base_path,
        ] {
            *s = f(s);
        }
        twin.base_sha256 = twin.base_sha256.as_deref().map(&f);
        if let Some(batch) = &mut twin.batch {
            batch.id = f(&batch.id);
        }
        for nic in &mut twin.nics {
            nic.attach = match &nic.attach {
                NicAttach::Network { network } => NicAttach::Network {
                    network: f(network),
                },
                NicAttach::Bridge { bridge } => NicAttach::Bridge { bridge: f(bridge) },
            };
            nic.model = f(&nic.model);
            nic.mac = f(&nic.mac);
        }
        if let Some(k) = &mut twin.kernel {
            k.kernel = f(&k.kernel);
            k.initrd = k.initrd.as_deref().map(&f);
            k.cmdline = k.cmdline.as_deref().map(&f);
        }
        twin.serial_log = twin.serial_log.as_deref().map(&f);
        twin
    }

    /// hatchery's metadata element for these inputs, read back through `JobMetadata` the way
    /// the domain stage writes it at define time.
    fn metadata(&self) -> Element {
        let mut job = Element::new("job")
            .attr("xmlns", metadata::NAMESPACE)
            .child(Element::leaf("id", self.job_id))
            .child(Element::leaf("attempt", 1))
            .child(Element::leaf("stage", "overlay"))
            .child(
                Element::new("overlay")
                    .attr("pool", &self.overlay_pool)
                    .attr("volume", &self.overlay_volume),
            );
        if let Some(batch) = &self.batch {
            job = job.child(
                Element::new("batch")
                    .attr("id", &batch.id)
                    .attr("size", batch.size),
            );
        }
        if let Some(digest) = &self.base_sha256 {
            job = job.child(Element::leaf("base-sha256", digest));
        }
        let meta = JobMetadata::parse(&job.render()).expect("metadata written by this helper");
        meta.to_element()
    }

    pub fn domain_xml(&self) -> String {
        xml::domain(&DomainSpec {
            name: self.name.clone(),
            domain_type: self.domain_type,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_path: self.overlay_path.clone(),
            nics: self.nics.clone(),
            console: self.console,
            console_listen: self.listen,
            kernel: self.kernel.clone(),
            serial_log: self.serial_log.clone(),
            metadata: self.metadata(),
        })
    }

    pub fn volume_xml(&self) -> String {
        xml::overlay_volume(
            &self.overlay_volume,
            self.capacity_bytes,
            &self.base_path,
            "qcow2",
        )
    }
}

/// What a value looks like after a round trip through XML: characters XML 1.0 cannot carry
/// become U+FFFD, as `xml::escape` documents.
pub fn as_xml_value(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => '\u{fffd}',
            c => c,
        })
        .collect()
}

/// Builds both documents and proves them harmless: well-formed, with exactly the element tree
/// of a twin whose strings are all plain, only the element names the builder writes, and
/// every value equal to its input.
pub fn assert_harmless(inputs: &Inputs) {
    // Empty stays empty: an empty optional value reads back as absent from the metadata.
    let twin = inputs.map_strings(|s| if s.is_empty() { "" } else { "v" }.to_owned());
    for (doc, twin_doc) in [
        (inputs.domain_xml(), twin.domain_xml()),
        (inputs.volume_xml(), twin.volume_xml()),
    ] {
        let parsed = Document::parse(&doc).unwrap_or_else(|e| panic!("{e}:\n{doc}"));
        let twin_parsed = Document::parse(&twin_doc).unwrap();
        assert_eq!(
            shape(parsed.root_element()),
            shape(twin_parsed.root_element()),
            "element tree depends on the values:\n{doc}"
        );
    }

    let domain = inputs.domain_xml();
    let doc = Document::parse(&domain).unwrap();
    assert_eq!(
        plain_names(doc.root_element()),
        expected_domain_names(inputs),
        "{domain}"
    );
    assert_domain_values(inputs, doc.root_element());

    let volume = inputs.volume_xml();
    let doc = Document::parse(&volume).unwrap();
    let root = doc.root_element();
    assert_eq!(text(root, &["name"]), as_xml_value(&inputs.overlay_volume));
    assert_eq!(text(root, &["capacity"]), inputs.capacity_bytes.to_string());
    assert_eq!(
        text(root, &["backingStore", "path"]),
        as_xml_value(&inputs.base_path)
    );
}

/// Every element in document order as `parent/child{namespace}[attributes]`.
fn shape(root: Node) -> Vec<String> {
    fn walk(node: Node, prefix: &str, out: &mut Vec<String>) {
        let tag = node.tag_name();
        let path = format!(
            "{prefix}/{}{{{}}}",
            tag.name(),
            tag.namespace().unwrap_or("")
        );
        let attrs: Vec<&str> = node.attributes().map(|a| a.name()).collect();
        out.push(format!("{path}{attrs:?}"));
        for child in node.children().filter(Node::is_element) {
            walk(child, &path, out);
        }
    }
    let mut out = Vec::new();
    walk(root, "", &mut out);
    out
}

/// Names of the elements outside hatchery's namespace. Inside `<metadata>` only hatchery's own
/// elements may appear, each at most once.
fn plain_names(root: Node) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for node in root.descendants().filter(Node::is_element) {
        match node.tag_name().namespace() {
            None => {
                names.insert(node.tag_name().name().to_owned());
            }
            Some(ns) => assert_eq!(ns, metadata::NAMESPACE, "foreign namespace"),
        }
    }
    let meta = child(root, "metadata");
    let inside: Vec<_> = meta
        .descendants()
        .skip(1)
        .filter(Node::is_element)
        .collect();
    let distinct: BTreeSet<_> = inside.iter().map(|n| n.tag_name().name()).collect();
    assert_eq!(distinct.len(), inside.len(), "a metadata element repeats");
    assert!(
        inside
            .iter()
            .all(|n| n.tag_name().namespace() == Some(metadata::NAMESPACE)),
        "a metadata element outside hatchery's namespace"
    );
    names
}

fn expected_domain_names(inputs: &Inputs) -> BTreeSet<String> {
    let mut names = vec![
        "domain",
        "name",
        "metadata",
        "memory",
        "vcpu",
        "os",
        "type",
        "features",
        "acpi",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "devices",
        "disk",
        "driver",
        "source",
        "target",
        "serial",
        "console",
        "graphics",
        "listen",
    ];
    if !inputs.nics.is_empty() {
        names.extend(["interface", "mac", "model"]);
    }
    match &inputs.kernel {
        Some(k) => {
            names.push("kernel");
            names.extend(k.initrd.as_ref().map(|_| "initrd"));
            names.extend(k.cmdline.as_ref().map(|_| "cmdline"));
        }
        None => names.push("boot"),
    }
    names.extend(inputs.serial_log.as_ref().map(|_| "log"));
    names.into_iter().map(str::to_owned).collect()
}

fn assert_domain_values(inputs: &Inputs, root: Node) {
    let v = as_xml_value;
    assert_eq!(text(root, &["name"]), v(&inputs.name));
    assert_eq!(text(root, &["memory"]), inputs.memory_mib.to_string());
    assert_eq!(text(root, &["vcpu"]), inputs.vcpus.to_string());
    let disk_source = child(child(child(root, "devices"), "disk"), "source");
    assert_eq!(
        disk_source.attribute("file"),
        Some(v(&inputs.overlay_path).as_str())
    );

    let devices = child(root, "devices");
    let nics: Vec<_> = devices
        .children()
        .filter(|n| n.has_tag_name("interface"))
        .collect();
    assert_eq!(nics.len(), inputs.nics.len(), "one <interface> per NIC");
    for (node, nic) in nics.iter().zip(&inputs.nics) {
        let (kind, value) = match &nic.attach {
            NicAttach::Network { network } => ("network", network),
            NicAttach::Bridge { bridge } => ("bridge", bridge),
        };
        assert_eq!(node.attribute("type"), Some(kind));
        assert_eq!(
            child(*node, "source").attribute(kind),
            Some(v(value).as_str())
        );
        assert_eq!(
            child(*node, "mac").attribute("address"),
            Some(v(&nic.mac).as_str())
        );
        assert_eq!(
            child(*node, "model").attribute("type"),
            Some(v(&nic.model).as_str())
        );
    }

    if let Some(k) = &inputs.kernel {
        assert_eq!(text(root, &["os", "kernel"]), v(&k.kernel));
        if let Some(initrd) = &k.initrd {
            assert_eq!(text(root, &["os", "initrd"]), v(initrd));
        }
        if let Some(cmdline) = &k.cmdline {
            assert_eq!(text(root, &["os", "cmdline"]), v(cmdline));
        }
    }
    if let Some(log) = &inputs.serial_log {
        let node = child(child(devices, "serial"), "log");
        assert_eq!(node.attribute("file"), Some(v(log).as_str()));
    }

    let job = child(child(root, "metadata"), "job");
    assert_eq!(text(job, &["id"]), inputs.job_id.to_string());
    let overlay = child(job, "overlay");
    assert_eq!(
        overlay.attribute("pool"),
        Some(v(&inputs.overlay_pool).as_str())
    );
    assert_eq!(
        overlay.attribute("volume"),
        Some(v(&inputs.overlay_volume).as_str())
    );
    if let Some(batch) = &inputs.batch {
        assert_eq!(
            child(job, "batch").attribute("id"),
            Some(v(&batch.id).as_str())
        );
    }
}

/// The only child element of `node` named `name`.
fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Node<'a, 'i> {
    let mut found = node.children().filter(|n| n.tag_name().name() == name);
    let first = found.next().unwrap_or_else(|| panic!("no <{name}>"));
    assert!(found.next().is_none(), "more than one <{name}>");
    first
}

/// The text of the element at `path` below `node`; empty when it has none.
fn text(node: Node, path: &[&str]) -> String {
    let target = path.iter().fold(node, |n, name| child(n, name));
    target.text().unwrap_or("").to_owned()
}
