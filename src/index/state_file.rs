//! The cluster-state file of `coral policy eval` and the standalone webhook: ImageSets (with
//! the status the controller writes: their mirror copies), nodes with the images they hold,
//! namespaces, mirror Registries and settings, in one YAML or JSON document.
//!
//! A JSON document (one that starts with `{`) is read with a JSON parser, which needs no more
//! memory than what it builds; the YAML parser holds the whole document's events first, so a
//! state of thousands of nodes is best written as JSON. Either way the references nodes hold
//! are interned while parsing: 5,000 nodes holding the same 100 images keep 100 strings.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use super::{ClusterIndex, ImageSetError, Labels, NodeTaint, Sym, Symbols, validate_image_set};
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
    #[error("state file {path} is not valid JSON: {source}")]
    ParseJson {
        path: String,
        source: serde_json::Error,
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
        "state file {path}: node {node:?}: digests[{image:?}]: {digest:?} is not a digest (sha256: and 64 hex digits)"
    )]
    Digest {
        path: String,
        node: String,
        image: String,
        digest: String,
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
    /// Mirror Registries, with the status the controller writes (`Reachable`).
    #[serde(default)]
    pub registries: Vec<crate::api::Registry>,
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
    /// Interned: nodes holding the same image share its reference.
    #[serde(default, deserialize_with = "interned")]
    pub images: Vec<Sym>,
    #[serde(default)]
    pub failed: Vec<String>,
    /// The digest the node holds each image under (`"nginx:1.27": "sha256:…"`), as its
    /// NodeImage reports: what pinning and drift are decided from.
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
    #[serde(default)]
    pub taints: Vec<NodeTaint>,
    #[serde(default)]
    pub unschedulable: bool,
}

thread_local! {
    /// The references of the state file being parsed on this thread.
    static PARSED_REFERENCES: RefCell<Symbols> = RefCell::default();
}

fn interned<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Sym>, D::Error> {
    let references: Vec<std::borrow::Cow<'de, str>> = Vec::deserialize(deserializer)?;
    Ok(PARSED_REFERENCES.with(|symbols| {
        let mut symbols = symbols.borrow_mut();
        references.iter().map(|r| symbols.intern(r)).collect()
    }))
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
    /// Reads and checks a state file. JSON is parsed as it is read, without the whole text
    /// in memory.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let shown = path.display().to_string();
        let read_error = |source| StateError::Read {
            path: shown.clone(),
            source,
        };
        let mut file = BufReader::with_capacity(1 << 16, File::open(path).map_err(read_error)?);
        let starts_json = file
            .fill_buf()
            .map_err(read_error)?
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            == Some(&b'{');
        if starts_json {
            let parsed = serde_json::from_reader(file);
            PARSED_REFERENCES.with(|symbols| symbols.take());
            let state = parsed.map_err(|source| StateError::ParseJson {
                path: shown.clone(),
                source,
            })?;
            return Self::check(state, &shown);
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(read_error)?;
        Self::parse(&text, &shown)
    }

    /// Parses and checks state-file text, JSON when it starts with `{`, YAML otherwise;
    /// `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, StateError> {
        let parsed = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|source| StateError::ParseJson {
                path: origin.to_string(),
                source,
            })
        } else {
            serde_yaml::from_str(text).map_err(|source| StateError::Parse {
                path: origin.to_string(),
                source,
            })
        };
        // The references stay with the nodes that hold them; the table goes.
        PARSED_REFERENCES.with(|symbols| symbols.take());
        Self::check(parsed?, origin)
    }

    /// Checks a parsed state file.
    fn check(state: Self, origin: &str) -> Result<Self, StateError> {
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
        let mut valid: HashSet<&str> = HashSet::new();
        for node in &state.nodes {
            let images = node.images.iter().map(|image| &**image);
            for image in images.chain(node.failed.iter().map(String::as_str)) {
                if valid.contains(image) {
                    continue;
                }
                ImageReference::parse(image).map_err(|source| StateError::NodeImage {
                    path: origin.to_string(),
                    node: node.name.clone(),
                    source,
                })?;
                valid.insert(image);
            }
            for (image, digest) in &node.digests {
                ImageReference::parse(image).map_err(|source| StateError::NodeImage {
                    path: origin.to_string(),
                    node: node.name.clone(),
                    source,
                })?;
                if !crate::image::is_digest(digest) {
                    return Err(StateError::Digest {
                        path: origin.to_string(),
                        node: node.name.clone(),
                        image: image.clone(),
                        digest: digest.clone(),
                    });
                }
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
        self.build_index(self.nodes.iter())
    }

    /// Like [`StateFile::to_index`], letting go of each node once it is indexed: the state
    /// file and its index are never both whole in memory.
    pub fn into_index(mut self) -> ClusterIndex {
        let nodes = std::mem::take(&mut self.nodes);
        self.build_index(nodes.into_iter())
    }

    fn build_index<N: std::borrow::Borrow<StateNode>>(
        &self,
        nodes: impl Iterator<Item = N>,
    ) -> ClusterIndex {
        let mut index = ClusterIndex::new();
        for set in &self.image_sets {
            let mut set = set.clone();
            set.metadata
                .namespace
                .get_or_insert_with(|| "default".to_string());
            index.apply_image_set(&set);
        }
        // The image label of each distinct reference, computed once.
        let mut image_labels: HashMap<Sym, Option<Sym>> = HashMap::new();
        let available = index.symbols.intern(LABEL_AVAILABLE);
        for node in nodes {
            let node = node.borrow();
            let mut labels: Vec<(Sym, Sym)> = node
                .labels
                .iter()
                .map(|(k, v)| (index.symbols.intern(k), index.symbols.intern(v)))
                .collect();
            for image in &node.images {
                let label = image_labels.entry(image.clone()).or_insert_with(|| {
                    let reference = ImageReference::parse(image).ok()?;
                    Some(index.symbols.intern(&label_key(&reference)))
                });
                if let Some(label) = label {
                    labels.push((label.clone(), available.clone()));
                }
            }
            let failed: BTreeSet<String> = node
                .failed
                .iter()
                .filter_map(|image| ImageReference::parse(image).ok())
                .map(|reference| reference.to_string())
                .collect();
            index.add_node_digests(node.digests.iter().filter_map(|(image, digest)| {
                let reference = ImageReference::parse(image).ok()?;
                Some((reference.to_string(), digest.clone()))
            }));
            index.node_mut(&node.name).labels = Labels::from_syms(labels);
            index.set_node_failures(&node.name, failed);
            index.set_node_scheduling(&node.name, node.taints.clone(), node.unschedulable);
        }
        for namespace in &self.namespaces {
            index.apply_namespace(&namespace.name, namespace.labels.clone());
        }
        for registry in &self.registries {
            index.apply_registry(registry);
        }
        index
    }
}
