//! Typed builders for the XML documents hatchery hands to libvirt.
//!
//! Element and attribute names are compile-time constants; every value, whatever its source, is
//! escaped on output. A job's strings can therefore change values but never add elements.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::job::{ConsoleKind, DomainType, NicAttach};

/// An XML element under construction.
#[derive(Debug, Clone)]
pub struct Element {
    name: &'static str,
    attrs: Vec<(&'static str, String)>,
    children: Vec<Node>,
}

#[derive(Debug, Clone)]
enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn attr(mut self, name: &'static str, value: impl ToString) -> Self {
        self.attrs.push((name, value.to_string()));
        self
    }

    pub fn child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    pub fn children(mut self, children: impl IntoIterator<Item = Element>) -> Self {
        self.children
            .extend(children.into_iter().map(Node::Element));
        self
    }

    pub fn text(mut self, text: impl ToString) -> Self {
        self.children.push(Node::Text(text.to_string()));
        self
    }

    /// `<name>text</name>`, the most common shape in libvirt's formats.
    pub fn leaf(name: &'static str, text: impl ToString) -> Self {
        Self::new(name).text(text)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write_to(&mut out, 0);
        out
    }

    fn write_to(&self, out: &mut String, depth: usize) {
        let indent = "  ".repeat(depth);
        let _ = write!(out, "{indent}<{}", self.name);
        for (name, value) in &self.attrs {
            let _ = write!(out, " {name}=\"{}\"", escape(value));
        }
        match self.children.as_slice() {
            [] => out.push_str("/>\n"),
            [Node::Text(text)] => {
                let _ = writeln!(out, ">{}</{}>", escape(text), self.name);
            }
            children => {
                out.push_str(">\n");
                for child in children {
                    match child {
                        Node::Element(e) => e.write_to(out, depth + 1),
                        Node::Text(t) => {
                            let _ = writeln!(out, "{indent}  {}", escape(t));
                        }
                    }
                }
                let _ = writeln!(out, "{indent}</{}>", self.name);
            }
        }
    }
}

/// Escapes text and attribute values. Characters XML 1.0 cannot carry at all become U+FFFD;
/// validation rejects them long before, this only keeps the document well-formed regardless.
/// Tab, newline and carriage return are written as character references: a parser turns them
/// into spaces in attribute values, and a carriage return into a newline in text.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A qcow2 overlay volume backed by `backing_path`, whose format is recorded so that QEMU never
/// has to guess it (guessing a raw base as qcow2 is a known escalation path).
pub fn overlay_volume(
    name: &str,
    capacity_bytes: u64,
    backing_path: &str,
    backing_format: &str,
) -> String {
    Element::new("volume")
        .child(Element::leaf("name", name))
        .child(
            Element::new("capacity")
                .attr("unit", "bytes")
                .text(capacity_bytes),
        )
        .child(Element::new("target").child(Element::new("format").attr("type", "qcow2")))
        .child(
            Element::new("backingStore")
                .child(Element::leaf("path", backing_path))
                .child(Element::new("format").attr("type", backing_format)),
        )
        .render()
}

/// Everything the domain XML is made from, already resolved from the job and the worker's
/// settings.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    pub name: String,
    pub domain_type: DomainType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_path: String,
    pub nics: Vec<NicXml>,
    pub console: ConsoleKind,
    pub console_listen: IpAddr,
    pub kernel: Option<KernelXml>,
    /// Where QEMU copies the serial console's output, for operators and boot timing.
    pub serial_log: Option<String>,
    pub metadata: Element,
}

#[derive(Debug, Clone)]
pub struct NicXml {
    pub attach: NicAttach,
    pub model: String,
    pub mac: String,
}

#[derive(Debug, Clone)]
pub struct KernelXml {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

pub fn domain(spec: &DomainSpec) -> String {
    let mut os = Element::new("os").child(Element::new("type").attr("arch", "x86_64").text("hvm"));
    if let Some(k) = &spec.kernel {
        os = os.child(Element::leaf("kernel", &k.kernel));
        if let Some(initrd) = &k.initrd {
            os = os.child(Element::leaf("initrd", initrd));
        }
        if let Some(cmdline) = &k.cmdline {
            os = os.child(Element::leaf("cmdline", cmdline));
        }
    } else {
        os = os.child(Element::new("boot").attr("dev", "hd"));
    }

    let disk = Element::new("disk")
        .attr("type", "file")
        .attr("device", "disk")
        .child(
            Element::new("driver")
                .attr("name", "qemu")
                .attr("type", "qcow2"),
        )
        .child(Element::new("source").attr("file", &spec.disk_path))
        .child(
            Element::new("target")
                .attr("dev", "vda")
                .attr("bus", "virtio"),
        );

    let nics = spec.nics.iter().map(|nic| {
        let (kind, source) = match &nic.attach {
            NicAttach::Network { network } => {
                ("network", Element::new("source").attr("network", network))
            }
            NicAttach::Bridge { bridge } => {
                ("bridge", Element::new("source").attr("bridge", bridge))
            }
        };
        Element::new("interface")
            .attr("type", kind)
            .child(Element::new("mac").attr("address", &nic.mac))
            .child(source)
            .child(Element::new("model").attr("type", &nic.model))
    });

    let graphics_type = match spec.console {
        ConsoleKind::Vnc => "vnc",
        ConsoleKind::Spice => "spice",
    };
    let listen = spec.console_listen.to_string();
    let graphics = Element::new("graphics")
        .attr("type", graphics_type)
        .attr("autoport", "yes")
        .attr("listen", &listen)
        .child(
            Element::new("listen")
                .attr("type", "address")
                .attr("address", &listen),
        );

    let mut serial = Element::new("serial").attr("type", "pty");
    if let Some(log) = &spec.serial_log {
        serial = serial.child(Element::new("log").attr("file", log).attr("append", "off"));
    }

    let devices = Element::new("devices")
        .child(disk)
        .children(nics)
        .child(serial)
        .child(Element::new("console").attr("type", "pty"))
        .child(graphics);

    Element::new("domain")
        .attr("type", spec.domain_type.as_str())
        .child(Element::leaf("name", &spec.name))
        .child(Element::new("metadata").child(spec.metadata.clone()))
        .child(
            Element::new("memory")
                .attr("unit", "MiB")
                .text(spec.memory_mib),
        )
        .child(Element::leaf("vcpu", spec.vcpus))
        .child(os)
        .child(Element::new("features").child(Element::new("acpi")))
        .child(Element::leaf("on_poweroff", "destroy"))
        .child(Element::leaf("on_reboot", "restart"))
        .child(Element::leaf("on_crash", "destroy"))
        .child(devices)
        .render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_cannot_add_elements() {
        let xml = Element::new("a")
            .attr("x", "'/><evil/>")
            .text("</a><evil/>")
            .render();
        let doc = roxmltree::Document::parse(&xml).expect("well-formed");
        assert_eq!(
            doc.root_element()
                .children()
                .filter(|n| n.is_element())
                .count(),
            0
        );
        assert_eq!(doc.root_element().attribute("x"), Some("'/><evil/>"));
        assert_eq!(doc.root_element().text(), Some("</a><evil/>"));
    }

    #[test]
    fn control_characters_keep_the_document_well_formed() {
        let xml = Element::leaf("a", "bell\u{7}nul\u{0}").render();
        assert!(roxmltree::Document::parse(&xml).is_ok());
    }
}
