//! Size limits on what a job may ask for, so a hostile message cannot exhaust a worker.

/// Bounds a job must stay within. Beyond one, the job is rejected, never truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest message accepted from the queue.
    pub message_bytes: usize,
    /// The largest finish script.
    pub script_bytes: usize,
    /// How many NICs one VM may have.
    pub nics: usize,
    /// How much of the finish script's stdout and stderr (each) the result keeps.
    pub output_tail_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            message_bytes: 256 * 1024,
            script_bytes: 128 * 1024,
            nics: 8,
            output_tail_bytes: 4 * 1024,
        }
    }
}
