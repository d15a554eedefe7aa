//! The `hatchery` command; everything it does lives in the library's `cli` module.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    limit_malloc_arenas();
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

/// glibc gives each thread that allocates its own arena, up to eight per core; with hundreds of
/// jobs hopping between threads that keeps tens of MiB resident for nothing. Two suffice.
fn limit_malloc_arenas() {
    const M_ARENA_MAX: libc::c_int = -8;
    // SAFETY: called first thing in `main`, before any other thread exists; mallopt only
    // adjusts allocator parameters.
    unsafe {
        libc::mallopt(M_ARENA_MAX, 2);
    }
}
