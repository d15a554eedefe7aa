//! Turning message bytes into a [`Job`], or into a [`RejectedJob`] that says every reason why not.

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Job, Limits};

/// The job contract, the same file that ships in `schemas/`.
pub const JOB_SCHEMA: &str = include_str!("../../schemas/job.schema.json");

/// One thing wrong with a job, at a JSON path such as `/provision/vm/name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)
    }
}

/// Why a message is not a job. The variants are the `reason` of a `job.rejected` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectedJob {
    #[error("message is {size} bytes, above the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message is not a valid job: {}", list(.0))]
    Invalid(Vec<Problem>),
}

impl RejectedJob {
    /// A short, bounded label for metrics, headers and the event's `reason` field.
    pub fn reason(&self) -> &'static str {
        match self {
            RejectedJob::TooLarge { .. } => "too_large",
            RejectedJob::NotJson(_) => "not_json",
            RejectedJob::Invalid(_) => "invalid",
        }
    }

    pub fn problems(&self) -> &[Problem] {
        match self {
            RejectedJob::Invalid(problems) => problems,
            _ => &[],
        }
    }
}

fn list(problems: &[Problem]) -> String {
    let parts: Vec<String> = problems.iter().map(Problem::to_string).collect();
    parts.join("; ")
}

/// Parses and validates one message: size, JSON syntax, the schema, then the semantic rules.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Job, RejectedJob> {
    if bytes.len() > limits.message_bytes {
        return Err(RejectedJob::TooLarge {
            size: bytes.len(),
            limit: limits.message_bytes,
        });
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        // serde_json's message names a line and column, never the content.
        RejectedJob::NotJson(e.to_string())
    })?;
    parse_value(&value, limits)
}

/// Like [`parse`], for a document that is already JSON.
pub fn parse_value(value: &Value, limits: &Limits) -> Result<Job, RejectedJob> {
    let mut problems = schema_problems(value);
    if problems.is_empty() {
        decimal_numbers("", value, &mut problems);
    }
    if !problems.is_empty() {
        return Err(RejectedJob::Invalid(problems));
    }

    // The schema accepted it, so a serde failure here means the types and the schema disagree;
    // it is still reported as the job's problem rather than a crash.
    let job: Job = serde_json::from_value(value.clone())
        .map_err(|e| RejectedJob::Invalid(vec![Problem::new("", e.to_string())]))?;

    let problems = super::validate(&job, limits);
    if problems.is_empty() {
        Ok(job)
    } else {
        Err(RejectedJob::Invalid(problems))
    }
}

/// Every number in a job is a whole count. JSON Schema calls `2048.0` and `2e3` integers, but the
/// Rust types do not, and serde would blame the whole document; name the field instead.
fn decimal_numbers(path: &str, value: &Value, problems: &mut Vec<Problem>) {
    match value {
        Value::Number(n) if n.is_f64() => problems.push(Problem::new(
            path,
            "must be an integer written without a fraction or exponent",
        )),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                decimal_numbers(&format!("{path}/{i}"), item, problems);
            }
        }
        Value::Object(fields) => {
            for (key, field) in fields {
                let key = key.replace('~', "~0").replace('/', "~1");
                decimal_numbers(&format!("{path}/{key}"), field, problems);
            }
        }
        _ => {}
    }
}

fn schema_problems(value: &Value) -> Vec<Problem> {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(JOB_SCHEMA).expect("the embedded job schema is valid JSON");
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&schema)
            .expect("the embedded job schema compiles")
    });

    // `masked` leaves the offending value out of the message: it may be a password.
    validator
        .iter_errors(value)
        .map(|e| Problem::new(e.instance_path().to_string(), e.masked().to_string()))
        .collect()
}
