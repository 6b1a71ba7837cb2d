use std::process::ExitCode;

use clap::Parser;

mod cli;

/// mimalloc: allocation-heavy policy evaluation runs about a fifth faster than on the system
/// allocator (see benches/decision.rs, which uses the same allocator). Built without
/// transparent huge pages, which would hold on to far more memory than the webhook uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match cli::Cli::parse().run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
