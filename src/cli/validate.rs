//! `hatchery validate FILE...`: every problem of every file, each with its JSON path.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::job::{self, Limits};

pub fn main(files: &[PathBuf]) -> ExitCode {
    let limits = Limits::default();
    let mut failed = false;
    for file in files {
        let shown = file.display();
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("{shown}: cannot read: {e}");
                failed = true;
                continue;
            }
        };
        match job::parse(&bytes, &limits) {
            Ok(job) => println!("{shown}: ok (job {})", job.id),
            Err(job::RejectedJob::Invalid(problems)) => {
                failed = true;
                for problem in problems {
                    println!("{shown}: {problem}");
                }
            }
            Err(other) => {
                failed = true;
                println!("{shown}: {other}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
