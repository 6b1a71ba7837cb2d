//! The cluster-state file of `coral policy eval` and the standalone webhook: ImageSets, nodes
//! with the images they hold, namespaces and settings, in one YAML or JSON document.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use super::{ClusterIndex, ImageSetError, NodeTaint, validate_image_set};
use crate::api::ImageSet;
use crate::image::{ImageReference, LABEL_AVAILABLE, ReferenceError, label_key};
use crate::policy::Settings;

/// A state file that cannot be used.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("state file {path}: ImageSet {namespace}/{name}: {source}")]
    ImageSet {
        path: String,
        namespace: String,
        name: String,
        source: Box<ImageSetError>,
    },
    #[error("state file {path}: ImageSet #{index} has no metadata.name")]
    UnnamedImageSet { path: String, index: usize },
    #[error("state file {path}: node {node:?}: {source}")]
    NodeImage {
        path: String,
        node: String,
        source: ReferenceError,
    },
    #[error(
        "state file {path}: node {node:?}: taints[{index}]: {reason} (a taint needs a key and an effect NoSchedule, PreferNoSchedule or NoExecute)"
    )]
    Taint {
        path: String,
        node: String,
        index: usize,
        reason: String,
    },
    #[error("state file {path}: settings: {source}")]
    Settings {
        path: String,
        source: crate::policy::SettingsError,
    },
}

/// The state file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateFile {
    #[serde(default)]
    pub image_sets: Vec<ImageSet>,
    #[serde(default)]
    pub nodes: Vec<StateNode>,
    #[serde(default)]
    pub namespaces: Vec<StateNamespace>,
    /// Replaces the settings of the policy set when present.
    #[serde(default)]
    pub settings: Option<Settings>,
}

/// A node: its labels, the images it holds (each stands for the label the agent would set),
/// the images whose pulls failed on it, and, in the Node's own shapes, its taints and whether
/// it is cordoned.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateNode {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub failed: Vec<String>,
    #[serde(default)]
    pub taints: Vec<NodeTaint>,
    #[serde(default)]
    pub unschedulable: bool,
}

/// A namespace and its labels.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateNamespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl StateFile {
    /// Reads and checks a state file.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| StateError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and checks state-file text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, StateError> {
        let state: StateFile = serde_yaml::from_str(text).map_err(|source| StateError::Parse {
            path: origin.to_string(),
            source,
        })?;
        for (index, set) in state.image_sets.iter().enumerate() {
            let Some(name) = set.metadata.name.clone() else {
                return Err(StateError::UnnamedImageSet {
                    path: origin.to_string(),
                    index,
                });
            };
            validate_image_set(&set.spec).map_err(|source| StateError::ImageSet {
                path: origin.to_string(),
                namespace: set.metadata.namespace.clone().unwrap_or_default(),
                name,
                source: Box::new(source),
            })?;
        }
        for node in &state.nodes {
            for image in node.images.iter().chain(&node.failed) {
                ImageReference::parse(image).map_err(|source| StateError::NodeImage {
                    path: origin.to_string(),
                    node: node.name.clone(),
                    source,
                })?;
            }
            for (index, taint) in node.taints.iter().enumerate() {
                let reason = if taint.key.is_empty() {
                    "the key is empty".to_string()
                } else if !["NoSchedule", "PreferNoSchedule", "NoExecute"]
                    .contains(&taint.effect.as_str())
                {
                    format!("unknown effect {:?}", taint.effect)
                } else {
                    continue;
                };
                return Err(StateError::Taint {
                    path: origin.to_string(),
                    node: node.name.clone(),
                    index,
                    reason,
                });
            }
        }
        if let Some(settings) = &state.settings {
            settings.validate().map_err(|source| StateError::Settings {
                path: origin.to_string(),
                source,
            })?;
        }
        Ok(state)
    }

    /// The index this state describes. ImageSets without a namespace are put in `default`.
    pub fn to_index(&self) -> ClusterIndex {
        let mut index = ClusterIndex::new();
        for set in &self.image_sets {
            let mut set = set.clone();
            set.metadata
                .namespace
                .get_or_insert_with(|| "default".to_string());
            index.apply_image_set(&set);
        }
        for node in &self.nodes {
            let mut labels = node.labels.clone();
            let mut failed = BTreeSet::new();
            for image in &node.images {
                if let Ok(reference) = ImageReference::parse(image) {
                    labels.insert(label_key(&reference), LABEL_AVAILABLE.to_string());
                }
            }
            for image in &node.failed {
                if let Ok(reference) = ImageReference::parse(image) {
                    failed.insert(reference.to_string());
                }
            }
            index.apply_node(&node.name, labels);
            index.set_node_failures(&node.name, failed);
            index.set_node_scheduling(&node.name, node.taints.clone(), node.unschedulable);
        }
        for namespace in &self.namespaces {
            index.apply_namespace(&namespace.name, namespace.labels.clone());
        }
        index
    }
}
