//! `coral mirror`: copy what ImageSets name into a registry, once, with no cluster.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use coral::agent::prefetch::load_image_sets;
use coral::credentials::Keyring;
use coral::image::ImageReference;
use coral::mirror::{Copier, DEFAULT_BLOB_CONCURRENCY, MirrorTarget, Platform};
use coral::report::{human_size, table};

#[derive(Debug, Args)]
pub struct MirrorArgs {
    /// ImageSet manifests (YAML; several documents per file allowed): every image they name
    /// is mirrored.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        required = true,
        value_delimiter = ','
    )]
    files: Vec<PathBuf>,
    /// The registry to mirror into, HOST[:PORT][/PREFIX]. An image goes to
    /// HOST[:PORT][/PREFIX]/SOURCE-REGISTRY/PATH (a source port written _PORT). Loopback
    /// registries are spoken to over plain HTTP, as containerd does; others over HTTPS.
    #[arg(long, value_name = "HOST[:PORT][/PREFIX]")]
    to: MirrorTarget,
    /// Registry credentials for both sides: a Docker `config.json` ({"auths": {...}}).
    #[arg(long, value_name = "FILE", env = "CORAL_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,
    /// Copy only these platforms of a multi-platform image (OS/ARCH[/VARIANT], repeatable).
    /// The index copied then lists only them, under a digest of its own. Default: every
    /// platform, and the index as it is.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_delimiter = ',')]
    platform: Vec<Platform>,
    /// Blobs of an image copied at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BLOB_CONCURRENCY)]
    concurrency: usize,
    /// Attempts per image before it counts as failed; between them a backoff of 1 s, doubled
    /// each time (at most 30 s), with jitter.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    attempts: u32,
}

/// The wait before attempt `next` (2, 3, …): 1 s doubled per attempt, at most 30 s, ±25 %.
fn backoff(next: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1 << (next - 2).min(5));
    base.min(Duration::from_secs(30))
        .mul_f64(0.75 + fastrand::f64() / 2.0)
}

pub fn run(args: MirrorArgs) -> Result<ExitCode> {
    // Progress goes to stdout; the log only carries what it cannot show.
    super::init_logging_with("error");
    let mut images = BTreeSet::new();
    for file in &args.files {
        for set in load_image_sets(file)? {
            for image in &set.spec.images {
                images.insert(
                    ImageReference::parse(image)
                        .with_context(|| format!("{}: ImageSet image", file.display()))?,
                );
            }
        }
    }
    let mut keyring = Keyring::new();
    if let Some(path) = &args.docker_config {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read --docker-config {}", path.display()))?;
        keyring.add_config_json(&bytes, &path.display().to_string())?;
    }
    // One thread: copying waits on the network, and bytes allocated as they are read are freed
    // on the thread that read them once written (with two, the allocator held on to tens of
    // MiB of a large layer in flight between them).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let copier = Copier::for_target(keyring, &args.to, &images, args.concurrency)?;
    let mut out = std::io::stdout();
    let mut rows = vec![vec![
        "IMAGE".to_string(),
        "MIRROR".to_string(),
        "STATE".to_string(),
        "DIGEST".to_string(),
        "COPIED".to_string(),
        "ERROR".to_string(),
    ]];
    let mut mirrored = 0;
    for image in &images {
        writeln!(out, "copying    {image}")?;
        out.flush()?;
        let mut attempt = 1;
        let result = loop {
            match runtime.block_on(copier.copy(image, &args.to, &args.platform)) {
                Err(error) if error.is_transient() && attempt < args.attempts => {
                    attempt += 1;
                    let wait = backoff(attempt);
                    writeln!(
                        out,
                        "retrying   {image} in {:.1} s (attempt {} of {} failed: {error})",
                        wait.as_secs_f64(),
                        attempt - 1,
                        args.attempts
                    )?;
                    out.flush()?;
                    std::thread::sleep(wait);
                }
                result => break result,
            }
        };
        match result {
            Ok(copied) => {
                mirrored += 1;
                if copied.already {
                    writeln!(out, "present    {image} as {}", copied.mirror)?;
                } else {
                    writeln!(
                        out,
                        "mirrored   {image} as {} in {:.1} s: {} blob(s) copied ({}), {} already there",
                        copied.mirror,
                        copied.took.as_secs_f64(),
                        copied.blobs_copied,
                        human_size(copied.bytes_copied),
                        copied.blobs_skipped
                    )?;
                }
                let digest = if copied.mirror_digest == copied.source_digest {
                    short(&copied.mirror_digest)
                } else {
                    format!(
                        "{} (source {})",
                        short(&copied.mirror_digest),
                        short(&copied.source_digest)
                    )
                };
                rows.push(vec![
                    image.to_string(),
                    copied.mirror.to_string(),
                    "mirrored".to_string(),
                    digest,
                    human_size(copied.bytes_copied),
                    String::new(),
                ]);
            }
            Err(error) => {
                writeln!(out, "failed     {image}: {error}")?;
                let mirror = coral::mirror::mirror_reference(image, &args.to)
                    .map(|m| m.to_string())
                    .unwrap_or_else(|_| "-".to_string());
                rows.push(vec![
                    image.to_string(),
                    mirror,
                    "failed".to_string(),
                    "-".to_string(),
                    "-".to_string(),
                    error.to_string(),
                ]);
            }
        }
    }
    write!(out, "\n{}", table(&rows))?;
    writeln!(
        out,
        "{mirrored} of {} image(s) mirrored to {}",
        images.len(),
        args.to
    )?;
    Ok(if mirrored == images.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn short(digest: &str) -> String {
    digest.chars().take(19).collect()
}
