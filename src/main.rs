//! The `hatchery` command; everything it does lives in the library's `cli` module.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = hatchery::cli::Cli::parse();
    hatchery::cli::init_logging(&cli);
    match hatchery::cli::main(cli) {
        Ok(code) => code,
        Err(e) => {
            // The one place the whole cause chain is printed.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
