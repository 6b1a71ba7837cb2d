//! Standalone mode: policies and cluster state from files, reloaded when they change.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use thiserror::Error;

use crate::index::{StateError, StateFile};
use crate::policy::{EvaluatorOptions, PolicyError, PolicySet, Snapshot};

/// Where a snapshot comes from.
#[derive(Debug, Clone)]
pub struct SnapshotSource {
    /// The cluster-state file (the format of `coral policy eval --state`).
    pub state: PathBuf,
    /// A policy directory or ConfigMap manifest; the embedded policies when `None`.
    pub policies: Option<PathBuf>,
}

/// A snapshot that cannot be built.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl SnapshotError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::State(_) => "state",
            Self::Policy(error) => error.metric_label(),
        }
    }
}

/// Builds a snapshot from the files.
pub fn load_snapshot(
    source: &SnapshotSource,
    options: &EvaluatorOptions,
) -> Result<Snapshot, SnapshotError> {
    let set = match &source.policies {
        Some(path) => PolicySet::load(path)?,
        None => PolicySet::embedded(),
    };
    let state = StateFile::load(&source.state)?;
    let snapshot = Snapshot::from_state_file(&set, state, options.clone())?;
    snapshot.probe()?;
    Ok(snapshot)
}

/// Modification times of files, by path.
pub(crate) type Stamp = Vec<(PathBuf, Option<SystemTime>)>;

/// The stamp of every file a snapshot was built from; a change means a reload.
pub(crate) fn source_stamp(source: &SnapshotSource) -> Stamp {
    let mut paths = vec![source.state.clone()];
    if let Some(policies) = &source.policies {
        paths.push(policies.clone());
        if let Ok(entries) = std::fs::read_dir(policies) {
            let mut files: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            paths.extend(files);
        }
    }
    paths
        .into_iter()
        .map(|path| {
            let modified = modified(&path);
            (path, modified)
        })
        .collect()
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
