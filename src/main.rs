use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    match cli::Cli::parse().run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", coral::report::error_message(&error));
            ExitCode::FAILURE
        }
    }
}

/// `coral demo | head` closes stdout early: end quietly, as other command-line tools do, rather
/// than with a panic message.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            // 128 + SIGPIPE, what a shell reports for a process ended by a closed pipe.
            std::process::exit(141);
        }
        default(info);
    }));
}
