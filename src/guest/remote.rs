//! The shell text hatchery runs on a guest for the finish protocol, and the parsing of answers.
//!
//! Every command is plain POSIX `sh` using tools busybox provides, because a minimal guest may
//! have nothing else. Paths are built from the job id only (hex digits and dashes), so they
//! need no quoting; anything else that enters a command goes through [`quote`].

use uuid::Uuid;

/// Where the guest keeps job directories; survives reboots, unlike `/tmp` on many images.
const BASE: &str = "/var/tmp";

/// The state of a job's directory on the guest, as the probe command reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobState {
    /// No directory and no tombstone: this job never ran here.
    Absent,
    /// The directory exists but the script was never started (an upload was interrupted).
    Unstarted,
    /// The start marker exists but the script has not written its pid yet.
    Starting,
    /// The script's process is alive.
    Running,
    /// The script ended with this status and its output is waiting to be collected.
    Finished(i32),
    /// An earlier attempt collected the output and removed the directory; only the status is left.
    Collected(i32),
    /// The script's process is gone without an exit status (the guest rebooted, or someone
    /// killed it).
    Lost,
}

/// What the probe command found: the login user's uid and the job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    pub uid: u32,
    pub state: JobState,
}

/// How a command that must run as root is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Privilege {
    /// Run as the login user (root already, or sudo not wanted).
    AsLoginUser,
    /// `sudo -S`, reading the password from the channel's stdin.
    SudoPassword,
    /// `sudo -n`, failing rather than prompting.
    SudoNoPassword,
}

impl Privilege {
    /// Wraps `command` to run with this privilege. The password itself never enters the text.
    pub fn wrap(self, command: &str) -> String {
        match self {
            Privilege::AsLoginUser => command.to_owned(),
            Privilege::SudoPassword => format!("sudo -S -p '' sh -c {}", quote(command)),
            Privilege::SudoNoPassword => format!("sudo -n sh -c {}", quote(command)),
        }
    }
}

/// Which captured stream of the script to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Commands addressing one job's directory on the guest.
#[derive(Debug, Clone)]
pub(crate) struct JobDir {
    job_id: Uuid,
    dir: String,
    /// The wrapper shell's `$0`: an argument of its own in `/proc/<pid>/cmdline`, so the probe
    /// can tell the script's process from an unrelated process that reused the pid.
    marker: String,
}

impl JobDir {
    pub fn new(job_id: Uuid) -> Self {
        let job_id_text = job_id.hyphenated();
        Self {
            job_id,
            dir: format!("{BASE}/hatchery-{job_id_text}"),
            marker: format!("hatchery-finish-{job_id_text}"),
        }
    }

    /// The directory's path on the guest.
    pub fn path(&self) -> &str {
        &self.dir
    }

    /// Prints `<uid> <state> [<exit code>]`. The order of the tests matters. The tombstone
    /// first: once it exists the job is settled, whatever directory a racing upload left.
    /// Liveness before the exit file, so a script that ends between the two checks reads as
    /// running, never as lost.
    pub fn probe(&self) -> String {
        let Self { dir, marker, .. } = self;
        format!(
            "d={dir}; u=$(id -u); \
             if [ -f \"$d.exit\" ]; then echo \"$u collected $(cat \"$d.exit\")\"; \
             elif [ -d \"$d\" ]; then \
               p=$(cat \"$d/pid\" 2>/dev/null); \
               if [ -n \"$p\" ] && {{ tr '\\000' '\\n' <\"/proc/$p/cmdline\"; }} 2>/dev/null \
                    | grep -qxF {marker}; then echo \"$u running\"; \
               elif [ -f \"$d/exit\" ]; then echo \"$u finished $(cat \"$d/exit\")\"; \
               elif [ -n \"$p\" ]; then echo \"$u lost\"; \
               elif [ -d \"$d/started\" ]; then echo \"$u starting\"; \
               else echo \"$u unstarted\"; fi; \
             else echo \"$u absent\"; fi"
        )
    }

    /// Creates the directory if needed and stores stdin as the script; does nothing once the
    /// job is settled. The size check makes an upload cut short by a dropped connection fail
    /// instead of leaving half a script; the temporary name is per upload, so two racing
    /// attempts never write into the same file.
    pub fn upload(&self, len: usize) -> String {
        let dir = &self.dir;
        format!(
            "d={dir}; [ -e \"$d.exit\" ] && exit 0; \
             [ -d \"$d\" ] || mkdir -m 700 \"$d\" || exit 1; \
             t=\"$d/script.tmp.$$\"; \
             if cat >\"$t\" && [ \"$(wc -c <\"$t\")\" -eq {len} ]; then mv -f \"$t\" \"$d/script\"; \
             else rm -f \"$t\"; exit 1; fi"
        )
    }

    /// Starts the script detached unless some attempt already did (or the job is settled).
    /// Prints `started`, `claimed` (another attempt started it) or `settled` (collected).
    ///
    /// `mkdir started` is the atomic claim: of two concurrent attempts only one starts the
    /// script. `setsid` (when present) gives the script its own process group, so a timeout
    /// can kill everything it spawned; all three standard streams are redirected so the SSH
    /// channel closes right away and its loss cannot signal the script.
    pub fn start(&self, interpreter: &[String]) -> String {
        let Self {
            job_id,
            dir,
            marker,
        } = self;
        let run = match interpreter {
            [] => "sh".to_owned(),
            words => words
                .iter()
                .map(|word| quote(word))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let wrapper = format!(
            "umask 022; d={dir}; \
             echo $$ >\"$d/pid.tmp\" && mv -f \"$d/pid.tmp\" \"$d/pid\"; \
             HATCHERY_JOB_ID={job_id} {run} \"$d/script\" <\"/dev/null\" >\"$d/stdout\" 2>\"$d/stderr\"; \
             echo $? >\"$d/exit.tmp\" && mv -f \"$d/exit.tmp\" \"$d/exit\""
        );
        format!(
            "d={dir}; if [ -e \"$d.exit\" ]; then echo settled; exit 0; fi; \
             [ -f \"$d/script\" ] || exit 3; \
             if ! mkdir \"$d/started\" 2>/dev/null; then echo claimed; exit 0; fi; \
             s=; if command -v setsid >/dev/null 2>&1; then s=setsid; fi; \
             $s sh -c {wrapper} {marker} </dev/null >/dev/null 2>&1 & \
             echo started",
            wrapper = quote(&wrapper),
        )
    }

    /// Sends TERM to the script's process group (or to the wrapper alone without `setsid`),
    /// waits up to five seconds for the wrapper to go, then KILLs whatever is left. The group
    /// is spelled `-<pgid>` without `--`: busybox's `kill` takes `--` for a pid and complains.
    pub fn kill(&self) -> String {
        let Self { dir, marker, .. } = self;
        format!(
            "d={dir}; p=$(cat \"$d/pid\" 2>/dev/null); [ -n \"$p\" ] || exit 0; \
             alive() {{ {{ tr '\\000' '\\n' <\"/proc/$p/cmdline\"; }} 2>/dev/null | grep -qxF {marker}; }}; \
             kill -TERM -\"$p\" 2>/dev/null || kill -TERM \"$p\" 2>/dev/null; \
             for i in 1 2 3 4 5; do alive || break; sleep 1; done; \
             kill -KILL -\"$p\" 2>/dev/null || kill -KILL \"$p\" 2>/dev/null; true"
        )
    }

    /// Prints the byte sizes of the captured stdout and stderr, separated by a space.
    pub fn sizes(&self) -> String {
        let dir = &self.dir;
        format!("d={dir}; echo \"$(wc -c <\"$d/stdout\") $(wc -c <\"$d/stderr\")\"")
    }

    /// Prints the last `bytes` bytes of one captured stream.
    pub fn tail(&self, stream: Stream, bytes: usize) -> String {
        let file = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        format!("tail -c {bytes} {}/{file}", self.dir)
    }

    /// Leaves the tombstone with the exit status, then removes the directory with the script and
    /// its output, which may hold secrets. Tombstone first: a crash in between must not lose it.
    /// A tombstone that is there already comes from a concurrent attempt and is kept.
    pub fn retire(&self) -> String {
        let dir = &self.dir;
        format!(
            "d={dir}; {{ [ -f \"$d.exit\" ] || mv -f \"$d/exit\" \"$d.exit\"; }} && rm -rf \"$d\""
        )
    }

    /// Removes the directory without a tombstone, after a run that produced no status.
    pub fn discard(&self) -> String {
        format!("rm -rf {}", self.dir)
    }

    /// Removes the directory unless its script was started (by a racing attempt, say).
    pub fn discard_unstarted(&self) -> String {
        let dir = &self.dir;
        format!("d={dir}; [ -d \"$d/started\" ] || rm -rf \"$d\"")
    }
}

/// The line a helper command printed last. Shells whose start-up files print something even
/// for non-interactive sessions put that in front of it.
fn last_line(output: &str) -> &str {
    output
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("")
}

/// Parses the probe's line: `<uid> <state> [<exit code>]`.
pub(crate) fn parse_probe(output: &str) -> Option<Probe> {
    let mut words = last_line(output).split_whitespace();
    let uid = words.next()?.parse().ok()?;
    let state = match (words.next()?, words.next()) {
        ("absent", None) => JobState::Absent,
        ("unstarted", None) => JobState::Unstarted,
        ("starting", None) => JobState::Starting,
        ("running", None) => JobState::Running,
        ("lost", None) => JobState::Lost,
        ("finished", Some(code)) => JobState::Finished(code.parse().ok()?),
        ("collected", Some(code)) => JobState::Collected(code.parse().ok()?),
        _ => return None,
    };
    words.next().is_none().then_some(Probe { uid, state })
}

/// Parses the answer of [`JobDir::start`]: whether this command started the script.
pub(crate) fn parse_start(output: &str) -> Option<bool> {
    match last_line(output).trim() {
        "started" => Some(true),
        "claimed" | "settled" => Some(false),
        _ => None,
    }
}

/// Parses the two sizes printed by [`JobDir::sizes`].
pub(crate) fn parse_sizes(output: &str) -> Option<(u64, u64)> {
    let mut words = last_line(output).split_whitespace();
    let sizes = (words.next()?.parse().ok()?, words.next()?.parse().ok()?);
    words.next().is_none().then_some(sizes)
}

/// The interpreter named by a `#!` line, split the way the kernel does: a path and at most one
/// argument. Empty when the script has no such line, and `sh` runs it.
pub(crate) fn interpreter(body: &str) -> Vec<String> {
    let Some(line) = body.lines().next().and_then(|line| line.strip_prefix("#!")) else {
        return Vec::new();
    };
    let line = line.trim();
    match line.split_once([' ', '\t']) {
        Some((path, arg)) => vec![path.to_owned(), arg.trim().to_owned()],
        None if line.is_empty() => Vec::new(),
        None => vec![line.to_owned()],
    }
}

/// Quotes `text` as one word for `sh`: single quotes, with each `'` spelled `'\''`.
pub(crate) fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines_parse_into_states() {
        let cases = [
            ("0 absent\n", Some((0, JobState::Absent))),
            ("1000 unstarted", Some((1000, JobState::Unstarted))),
            ("0 starting", Some((0, JobState::Starting))),
            ("0 running", Some((0, JobState::Running))),
            ("0 finished 3", Some((0, JobState::Finished(3)))),
            ("0 collected 0", Some((0, JobState::Collected(0)))),
            ("0 lost", Some((0, JobState::Lost))),
            ("0 finished", None),
            ("0 finished three", None),
            ("0 running 1", None),
            ("root running", None),
            ("0 exploded", None),
            (
                "motd from .bashrc\n0 running\n\n",
                Some((0, JobState::Running)),
            ),
            ("", None),
        ];
        for (line, expected) in cases {
            let expected = expected.map(|(uid, state)| Probe { uid, state });
            assert_eq!(parse_probe(line), expected, "line {line:?}");
        }
    }

    #[test]
    fn start_answers_say_who_started_the_script() {
        assert_eq!(parse_start("started\n"), Some(true));
        assert_eq!(parse_start("claimed\n"), Some(false));
        assert_eq!(parse_start("settled\n"), Some(false));
        assert_eq!(parse_start("welcome\nstarted\n"), Some(true));
        assert_eq!(parse_start("started later\n"), None);
    }

    #[test]
    fn sizes_parse_with_stray_whitespace_only() {
        assert_eq!(parse_sizes("12 0\n"), Some((12, 0)));
        assert_eq!(parse_sizes("  12   7 "), Some((12, 7)));
        assert_eq!(parse_sizes("12"), None);
        assert_eq!(parse_sizes("12 7 1"), None);
    }

    #[test]
    fn shebang_splits_like_the_kernel() {
        assert_eq!(interpreter("echo hi\n"), Vec::<String>::new());
        assert_eq!(interpreter("#!\necho hi\n"), Vec::<String>::new());
        assert_eq!(interpreter("#!/bin/bash\n"), ["/bin/bash"]);
        assert_eq!(interpreter("#! /bin/sh -eu \n"), ["/bin/sh", "-eu"]);
        assert_eq!(
            interpreter("#!/usr/bin/env -S sh -e\n"),
            ["/usr/bin/env", "-S sh -e"]
        );
    }

    #[test]
    fn quoted_text_reaches_the_shell_unchanged() {
        let text = "it's $HOME `id` \"quoted\" \\ ; done";
        let output = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s {}", quote(text))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(output.stdout).unwrap(), text);
    }

    #[test]
    fn sudo_wraps_the_whole_command() {
        let wrapped = Privilege::SudoPassword.wrap("echo 'a'");
        assert_eq!(wrapped, r"sudo -S -p '' sh -c 'echo '\''a'\'''");
        assert_eq!(Privilege::AsLoginUser.wrap("id"), "id");
        assert_eq!(Privilege::SudoNoPassword.wrap("id"), "sudo -n sh -c 'id'");
    }
}
