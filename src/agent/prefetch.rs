//! `coral prefetch`: the pull engine, once, with no cluster.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;

use super::cri::Cri;
use super::engine::{Engine, EngineOptions};
use super::tracker::Tracker;
use super::wanted_images;
use crate::api::{ImageSet, ImageState};
use crate::credentials::Keyring;
use crate::index::validate_image_set;
use crate::metrics::AgentMetrics;

/// What `coral prefetch` is asked to do.
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    pub files: Vec<PathBuf>,
    pub cri_socket: String,
    pub node_labels: BTreeMap<String, String>,
    pub docker_config: Option<PathBuf>,
    pub engine: EngineOptions,
}

/// Reads every ImageSet of a YAML file (several documents allowed). Each must be valid.
pub fn load_image_sets(path: &Path) -> anyhow::Result<Vec<ImageSet>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut sets = Vec::new();
    for (number, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("{}: document {} is not YAML", path.display(), number + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default();
        if kind != "ImageSet" {
            bail!(
                "{}: document {} is a {:?}, not an ImageSet",
                path.display(),
                number + 1,
                kind
            );
        }
        let set: ImageSet = serde_yaml::from_value(value).with_context(|| {
            format!(
                "{}: document {} is not a valid ImageSet",
                path.display(),
                number + 1
            )
        })?;
        let name = set.metadata.name.clone().unwrap_or_default();
        validate_image_set(&set.spec)
            .with_context(|| format!("{}: ImageSet {name}", path.display()))?;
        sets.push(set);
    }
    Ok(sets)
}

/// Pulls what the ImageSets want on a node with the given labels, reporting progress to `out`,
/// and prints a summary. Returns whether every wanted image is available.
pub async fn prefetch(
    options: PrefetchOptions,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<bool> {
    let mut sets = Vec::new();
    for file in &options.files {
        sets.extend(load_image_sets(file)?);
    }
    let mut keyring = Keyring::new();
    if let Some(path) = &options.docker_config {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read --docker-config {}", path.display()))?;
        keyring.add_config_json(&bytes, &path.display().to_string())?;
    }
    for set in &sets {
        if !set.spec.image_pull_secrets.is_empty() {
            writeln!(
                out,
                "note: ImageSet {} names imagePullSecrets; without a cluster they are not read (use --docker-config)",
                set.metadata.name.as_deref().unwrap_or_default()
            )?;
        }
    }
    let refs: Vec<&ImageSet> = sets.iter().collect();
    let wanted = wanted_images(&refs, &options.node_labels);
    if wanted.is_empty() {
        writeln!(
            out,
            "no ImageSet selects a node with these labels; nothing to pull"
        )?;
        return Ok(true);
    }

    let cri = Cri::new(&options.cri_socket)?;
    let version = cri.version().await.with_context(|| {
        format!(
            "cannot reach the container runtime at {}",
            options.cri_socket
        )
    })?;
    writeln!(
        out,
        "runtime {} {} (CRI {}), {} image(s) wanted",
        version.runtime_name,
        version.runtime_version,
        version.api_version,
        wanted.len()
    )?;
    let engine = Engine::new(cri, options.engine.clone(), AgentMetrics::new());
    let keyring = Arc::new(keyring);
    let mut changes = engine.subscribe();
    engine.set_wanted(wanted.into_keys().map(|image| (image, keyring.clone())));
    let runner = tokio::spawn(engine.clone().run());

    let mut seen: BTreeMap<String, (ImageState, u32, bool)> = BTreeMap::new();
    let max_attempts = options.engine.retry.max_attempts;
    loop {
        let tracker = engine.snapshot();
        for record in tracker.records() {
            let now = (record.state, record.attempts, record.in_flight);
            let key = record.reference.to_string();
            if seen.get(&key) == Some(&now) {
                continue;
            }
            let before = seen.insert(key.clone(), now);
            match (record.state, before) {
                (ImageState::Available, Some((ImageState::Available, ..))) => {}
                (ImageState::Available, _) if record.pulls > 0 => {
                    writeln!(out, "pulled     {key}")?;
                }
                (ImageState::Available, _) => writeln!(out, "present    {key}")?,
                (_, _) if record.in_flight => writeln!(out, "pulling    {key}")?,
                (ImageState::Failed, _) => writeln!(
                    out,
                    "failed     {key} after {} attempt(s): {}",
                    record.attempts,
                    record.last_error.as_deref().unwrap_or_default()
                )?,
                (_, _) if record.attempts > 0 => writeln!(
                    out,
                    "retrying   {key} (attempt {} of {max_attempts} failed: {})",
                    record.attempts,
                    record.last_error.as_deref().unwrap_or_default()
                )?,
                (ImageState::Paused, _) => writeln!(
                    out,
                    "paused     {key}: {}",
                    engine.paused_reason().unwrap_or_default()
                )?,
                _ => {}
            }
        }
        out.flush()?;
        if tracker.settled() {
            break;
        }
        if changes.changed().await.is_err() {
            break;
        }
    }
    runner.abort();
    let tracker = engine.snapshot();
    write!(out, "\n{}", summary(&tracker))?;
    let counts = tracker.counts();
    writeln!(
        out,
        "{} of {} image(s) available",
        counts.available, counts.wanted
    )?;
    Ok(counts.available == counts.wanted)
}

/// The summary table.
pub fn summary(tracker: &Tracker) -> String {
    let mut rows = vec![vec![
        "IMAGE".to_string(),
        "STATE".to_string(),
        "DIGEST".to_string(),
        "SIZE".to_string(),
        "ATTEMPTS".to_string(),
        "ERROR".to_string(),
    ]];
    for record in tracker.records() {
        let held = record.held.as_ref();
        rows.push(vec![
            record.reference.to_string(),
            state_name(record.state).to_string(),
            held.and_then(|h| h.digest.clone())
                .map(|d| d.chars().take(19).collect())
                .unwrap_or_else(|| "-".to_string()),
            held.map_or_else(|| "-".to_string(), |h| crate::report::human_size(h.size)),
            record.attempts.to_string(),
            record.last_error.clone().unwrap_or_default(),
        ]);
    }
    crate::report::table(&rows)
}

/// The name of a state as it appears in NodeImage status.
pub fn state_name(state: ImageState) -> &'static str {
    match state {
        ImageState::Pulling => "pulling",
        ImageState::Available => "available",
        ImageState::Failed => "failed",
        ImageState::Paused => "paused",
    }
}
