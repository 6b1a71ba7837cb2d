//! `coral image`: image references and their node label keys.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use coral::image::{ImageReference, label_key};
use serde_json::{Value, json};

use super::ListFormat;

#[derive(Debug, Subcommand)]
pub(super) enum ImageCommand {
    /// Print the normalized form and the node label key of each reference.
    Key(ImageKeyArgs),
}

#[derive(Debug, Args)]
pub(super) struct ImageKeyArgs {
    /// Image references, such as nginx:1.27 or ghcr.io/org/app@sha256:….
    #[arg(required = true, value_name = "REF")]
    references: Vec<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text", env = "CORAL_OUTPUT")]
    output: ListFormat,
}

pub(super) fn image_key(args: ImageKeyArgs) -> Result<ExitCode> {
    let ImageKeyArgs { references, output } = args;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for reference in &references {
        match ImageReference::parse(reference) {
            Ok(parsed) => rows.push((reference, parsed.to_string(), label_key(&parsed))),
            Err(error) => errors.push(error),
        }
    }
    if !errors.is_empty() {
        for error in &errors {
            eprintln!("error: {error}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let mut out = std::io::stdout().lock();
    match output {
        ListFormat::Text => {
            for (_, normalized, label) in &rows {
                writeln!(out, "{normalized}\t{label}")?;
            }
        }
        ListFormat::Json => {
            let array: Vec<Value> = rows
                .iter()
                .map(|(reference, normalized, label)| {
                    json!({"reference": reference, "normalized": normalized, "label": label})
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&array)?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
