//! `coral crd`: the CustomResourceDefinitions.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub(super) struct CrdArgs {
    /// Write one file per CRD into this directory instead of printing them.
    #[arg(long, value_name = "DIR", env = "CORAL_CRD_OUTPUT_DIR")]
    output_dir: Option<PathBuf>,
}

pub(super) fn crd(args: CrdArgs) -> Result<ExitCode> {
    let CrdArgs { output_dir } = args;
    match output_dir {
        Some(dir) => {
            for path in coral::api::write_crds(&dir)? {
                eprintln!("wrote {}", path.display());
            }
        }
        None => print!("{}", coral::api::crd_stream()?),
    }
    Ok(ExitCode::SUCCESS)
}
