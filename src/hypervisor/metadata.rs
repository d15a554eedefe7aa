//! hatchery's record inside each domain it defines: the job's identity and how far it got, so
//! that a redelivered job, a deprovision request or the reconciler can find everything hatchery
//! made from libvirt alone.

use std::str::FromStr;

use uuid::Uuid;

use super::xml::Element;
use crate::events::Failure;
use crate::job::BatchRef;
use crate::stages::{ErrorClass, StageKind};

/// The XML namespace of hatchery's `<metadata>` element. Its presence marks a domain as
/// hatchery's; nothing without it is ever modified or removed.
pub const NAMESPACE: &str = "https://hatchery.dev/xmlns/job/1";

/// The prefix the element carries in the domain XML (libvirt returns it without).
pub const PREFIX: &str = "hatchery";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMetadata {
    pub job_id: Uuid,
    pub batch: Option<BatchRef>,
    /// How many times a worker has started on this job, this one included.
    pub attempt: u32,
    /// The last stage that completed.
    pub stage: Option<StageKind>,
    pub base_sha256: Option<String>,
    pub overlay_pool: String,
    pub overlay_volume: String,
    /// When the domain was last started, in seconds since the epoch; leases older than this
    /// belong to an earlier guest.
    pub started_at: Option<i64>,
    pub state: JobState,
    /// Where and why the job failed, once it has, for the run that finishes an interrupted
    /// rollback.
    pub failure: Option<Failure>,
    /// When a worker last wrote this record, in seconds since the epoch.
    pub updated_at: Option<i64>,
    /// The finish script's result, kept here before its output is removed from the guest.
    pub finish: Option<FinishRecord>,
}

/// A collected finish script's result, its output already stripped of the job's secrets.
///
/// It outlives the files on the guest, so a worker that dies between collecting the script
/// and publishing the job's outcome leaves the next run the whole result, not only the exit
/// status the guest keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishRecord {
    /// The id the script ran under on the guest (the job id, or one per rerun).
    pub run: Uuid,
    pub exit_code: i32,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub host_key_fingerprint: String,
}

/// Where the job that made a domain stands, as far as the domain itself can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JobState {
    /// A worker is (or was, before it died) provisioning it.
    #[default]
    Running,
    /// The job failed and its rollback started; a redelivery finishes the rollback.
    RollingBack,
    /// The rollback is done: the guest is stopped and its overlay gone. Only this definition,
    /// holding the record, is left until the job's outcome is published; a redelivery that
    /// finds it reports the outcome again instead of running the job.
    RolledBack,
    /// The job failed and asked to keep what it made.
    Kept,
    Succeeded,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::RollingBack => "rolling-back",
            JobState::RolledBack => "rolled-back",
            JobState::Kept => "kept",
            JobState::Succeeded => "succeeded",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::RollingBack,
            Self::RolledBack,
            Self::Kept,
            Self::Succeeded,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

impl JobMetadata {
    /// The element as it appears inside `<metadata>` at define time.
    pub fn to_element(&self) -> Element {
        self.build(true).attr("xmlns:hatchery", NAMESPACE)
    }

    /// The XML `virDomainSetMetadata` takes: the element without prefix or namespace, which
    /// libvirt adds from the key and URI it is given.
    pub fn to_xml(&self) -> String {
        self.build(false).render()
    }

    fn build(&self, prefixed: bool) -> Element {
        // Element names are static: pick the prefixed or bare spelling of each.
        let name = |with: &'static str| {
            if prefixed {
                with
            } else {
                &with[PREFIX.len() + 1..]
            }
        };
        let mut el = Element::new(name("hatchery:job"))
            .child(Element::leaf(name("hatchery:id"), self.job_id))
            .child(Element::leaf(name("hatchery:attempt"), self.attempt))
            .child(
                Element::new(name("hatchery:overlay"))
                    .attr("pool", &self.overlay_pool)
                    .attr("volume", &self.overlay_volume),
            );
        if let Some(batch) = &self.batch {
            el = el.child(
                Element::new(name("hatchery:batch"))
                    .attr("id", &batch.id)
                    .attr("size", batch.size),
            );
        }
        if let Some(stage) = self.stage {
            el = el.child(Element::leaf(name("hatchery:stage"), stage.as_str()));
        }
        if let Some(digest) = &self.base_sha256 {
            el = el.child(Element::leaf(name("hatchery:base-sha256"), digest));
        }
        if let Some(at) = self.started_at {
            el = el.child(Element::leaf(name("hatchery:started-at"), at));
        }
        el = el.child(Element::leaf(name("hatchery:state"), self.state.as_str()));
        if let Some(failure) = &self.failure {
            let stage = failure.stage.as_str();
            el = el.child(Element::leaf(name("hatchery:failed-stage"), stage));
            el = el.child(
                Element::leaf(name("hatchery:failure"), &failure.message)
                    .attr("class", failure.class.as_str()),
            );
        }
        if let Some(at) = self.updated_at {
            el = el.child(Element::leaf(name("hatchery:updated-at"), at));
        }
        if let Some(finish) = &self.finish {
            // Output may hold any byte XML 1.0 forbids (escape sequences, NUL): hex it.
            let tail = |el_name, text: &str| Element::leaf(name(el_name), hex::encode(text));
            el = el.child(
                Element::new(name("hatchery:finish"))
                    .attr("run", finish.run)
                    .attr("exit-code", finish.exit_code)
                    .attr("host-key", &finish.host_key_fingerprint)
                    .attr("stdout-truncated", finish.stdout_truncated)
                    .attr("stderr-truncated", finish.stderr_truncated)
                    .child(tail("hatchery:stdout", &finish.stdout_tail))
                    .child(tail("hatchery:stderr", &finish.stderr_tail)),
            );
        }
        el
    }

    /// Parses the element `virDomainGetMetadata` returns.
    pub fn parse(xml: &str) -> Result<Self, MetadataError> {
        let doc = roxmltree::Document::parse(xml).map_err(MetadataError::NotXml)?;
        let root = doc.root_element();
        let child = |name: &str| root.children().find(|n| n.tag_name().name() == name);
        let text = |name: &str| child(name).and_then(|n| n.text()).map(str::trim);

        let job_id = text("id")
            .and_then(|t| Uuid::parse_str(t).ok())
            .ok_or(MetadataError::Missing("id"))?;
        let attempt = text("attempt").and_then(|t| t.parse().ok()).unwrap_or(1);
        let overlay = child("overlay").ok_or(MetadataError::Missing("overlay"))?;
        let batch = child("batch").and_then(|b| {
            Some(BatchRef {
                id: b.attribute("id")?.to_owned(),
                size: b.attribute("size")?.parse().ok()?,
            })
        });

        Ok(Self {
            job_id,
            batch,
            attempt,
            stage: text("stage").and_then(|t| StageKind::from_str(t).ok()),
            base_sha256: text("base-sha256").map(str::to_owned),
            overlay_pool: overlay
                .attribute("pool")
                .ok_or(MetadataError::Missing("pool"))?
                .into(),
            overlay_volume: overlay
                .attribute("volume")
                .ok_or(MetadataError::Missing("volume"))?
                .into(),
            started_at: text("started-at").and_then(|t| t.parse().ok()),
            state: text("state").and_then(JobState::parse).unwrap_or_default(),
            failure: text("failed-stage")
                .and_then(|t| StageKind::from_str(t).ok())
                .map(|stage| Failure {
                    stage,
                    // A record without a class still names where the job failed.
                    class: (child("failure").and_then(|n| n.attribute("class")))
                        .and_then(ErrorClass::parse)
                        .unwrap_or(ErrorClass::Interrupted),
                    message: text("failure").unwrap_or_default().to_owned(),
                }),
            updated_at: text("updated-at").and_then(|t| t.parse().ok()),
            finish: child("finish").and_then(FinishRecord::parse),
        })
    }
}

impl FinishRecord {
    /// Reads the `<finish>` element; a damaged record counts as none, and the guest's own
    /// exit status is used instead.
    fn parse(node: roxmltree::Node) -> Option<Self> {
        let flag = |attr| node.attribute(attr).map(|v| v == "true");
        let tail = |el_name| {
            let el = node.children().find(|n| n.tag_name().name() == el_name)?;
            let bytes = hex::decode(el.text().unwrap_or("").trim()).ok()?;
            String::from_utf8(bytes).ok()
        };
        Some(Self {
            run: Uuid::parse_str(node.attribute("run")?).ok()?,
            exit_code: node.attribute("exit-code")?.parse().ok()?,
            stdout_tail: tail("stdout")?,
            stderr_tail: tail("stderr")?,
            stdout_truncated: flag("stdout-truncated")?,
            stderr_truncated: flag("stderr-truncated")?,
            host_key_fingerprint: node.attribute("host-key")?.to_owned(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("hatchery metadata is not XML")]
    NotXml(#[source] roxmltree::Error),
    #[error("hatchery metadata lacks `{0}`")]
    Missing(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_xml_without_the_prefix() {
        let meta = JobMetadata {
            job_id: Uuid::new_v4(),
            batch: Some(BatchRef {
                id: "b1".into(),
                size: 3,
            }),
            attempt: 2,
            stage: Some(StageKind::Domain),
            base_sha256: Some("ab".repeat(32)),
            overlay_pool: "default".into(),
            overlay_volume: "vm.qcow2".into(),
            started_at: Some(1_700_000_000),
            state: JobState::RollingBack,
            failure: Some(Failure {
                stage: StageKind::Finish,
                class: ErrorClass::ScriptFailed,
                message: "finish script exited with status 3".into(),
            }),
            updated_at: Some(1_700_000_100),
            finish: Some(FinishRecord {
                run: Uuid::new_v4(),
                exit_code: 3,
                stdout_tail: "done \u{1b}[32mok\u{1b}[0m <&>\n".into(),
                stderr_tail: String::new(),
                stdout_truncated: true,
                stderr_truncated: false,
                host_key_fingerprint: "SHA256:abc".into(),
            }),
        };
        // libvirt hands the element back with a default namespace instead of the prefix.
        assert_eq!(JobMetadata::parse(&meta.to_xml()).expect("parses"), meta);
        let defined = meta.to_element().render();
        assert_eq!(JobMetadata::parse(&defined).expect("parses"), meta);
    }
}
