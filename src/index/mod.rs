//! The cluster state Coral's policies see: ImageSets, nodes and their labels, namespaces.
//!
//! Pure and synchronous: watchers (or a state file) feed it with `apply_*` and `delete_*`, and
//! readers ask it for image availability. It holds no client.

mod labels;
mod live;
mod objects;
mod placement;
mod selector;
mod state_file;
mod stranded;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use thiserror::Error;

pub use labels::{LabelMap, Labels, Sym, Symbols};
pub use live::{LiveIndex, WatchedNode, WatchedNodeImage};
pub use objects::ClusterObjects;
pub use placement::{
    NodeTaint, Placement, PlacementNode, RequiredImages, RequiredLabel, UNSCHEDULABLE_TAINT,
    required_image_labels,
};
pub use selector::{Selector, SelectorError};
pub use state_file::{StateError, StateFile, StateNamespace, StateNode};
pub use stranded::{Stranded, scheduling_pod_spec, stranded_workload, workload_name};

use crate::api::{ImageSet, ImageSetSpec};
use crate::image::{ImageReference, LABEL_AVAILABLE, ReferenceError, is_image_label, label_key};

/// Why an ImageSet cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ImageSetError {
    #[error("spec.images[{index}]: {source}")]
    Reference {
        index: usize,
        source: ReferenceError,
    },
    #[error(
        "spec.images[{index}] {image:?} is the same image as spec.images[{first}] ({normalized})"
    )]
    Duplicate {
        index: usize,
        first: usize,
        image: String,
        normalized: String,
    },
    #[error("spec.images is empty")]
    NoImages,
    #[error("spec.nodeSelector.{0}")]
    Selector(SelectorError),
    #[error("spec.refresh: {0}")]
    Refresh(String),
}

/// The shortest `spec.refresh`: each period costs every targeted node a manifest request per
/// tag.
pub const MIN_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// An ImageSet's images, normalized, and its compiled selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidImageSet {
    pub images: Vec<ImageReference>,
    pub selector: Selector,
    /// How often tags are resolved again, when they are.
    pub refresh: Option<std::time::Duration>,
}

/// Checks an ImageSet spec: every reference parses, no image appears twice after
/// normalization, the node selector is valid.
pub fn validate_image_set(spec: &ImageSetSpec) -> Result<ValidImageSet, ImageSetError> {
    if spec.images.is_empty() {
        return Err(ImageSetError::NoImages);
    }
    let selector = Selector::new(spec.node_selector.as_ref()).map_err(ImageSetError::Selector)?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut images = Vec::with_capacity(spec.images.len());
    for (index, raw) in spec.images.iter().enumerate() {
        let reference = ImageReference::parse(raw)
            .map_err(|source| ImageSetError::Reference { index, source })?;
        let normalized = reference.to_string();
        if let Some(&first) = seen.get(&normalized) {
            return Err(ImageSetError::Duplicate {
                index,
                first,
                image: raw.clone(),
                normalized,
            });
        }
        seen.insert(normalized, index);
        images.push(reference);
    }
    let refresh = spec
        .refresh
        .as_deref()
        .map(|text| {
            let period = crate::time::parse_duration(text).map_err(ImageSetError::Refresh)?;
            if period < MIN_REFRESH {
                return Err(ImageSetError::Refresh(format!(
                    "{text:?} is shorter than the least period, {}s",
                    MIN_REFRESH.as_secs()
                )));
            }
            Ok(period)
        })
        .transpose()?;
    Ok(ValidImageSet {
        images,
        selector,
        refresh,
    })
}

/// What the index holds of one ImageSet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexedImageSet {
    /// Valid references; invalid ones are skipped (the validating webhook rejects them).
    images: Vec<ImageReference>,
    /// `None` when the selector is invalid: such a set targets no node.
    selector: Option<Selector>,
    /// It pulls with `imagePullSecrets`: its images are private to its namespace.
    credentials: bool,
    /// The copies its status records in its mirror Registry, by normalized source reference.
    copies: BTreeMap<String, IndexedCopy>,
    /// The digests its status says the targeted nodes hold, by normalized reference.
    digests: BTreeMap<String, BTreeSet<String>>,
}

/// One image's copy in a mirror, as an ImageSet's status records it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexedCopy {
    registry: String,
    reference: String,
    digest: Option<String>,
    /// The source digest it was copied from.
    source_digest: Option<String>,
    /// The mirror holds it (state `mirrored`).
    mirrored: bool,
}

/// What the index holds of one Registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RegistryHealth {
    pub endpoint: String,
    /// Its `Reachable` condition is True: the controller's last probe answered.
    pub reachable: bool,
}

/// An image's copy in a mirror, for the policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorAvailability {
    /// The mirror reference pods would pull.
    pub reference: String,
    pub digest: Option<String>,
    pub registry: String,
    /// The mirror holds it and its Registry answered the last probe.
    pub ready: bool,
}

/// What the index holds of one node. Shared between an index and its clones until one of
/// them changes the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct IndexedNode {
    labels: Labels,
    /// Taints of the node, every effect.
    taints: Vec<NodeTaint>,
    /// `spec.unschedulable`: the node is cordoned.
    unschedulable: bool,
}

/// Availability of one managed image across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageAvailability {
    /// Node label key of the image.
    pub label: String,
    /// ImageSets managing it, as `namespace/name`.
    pub image_sets: Vec<String>,
    /// Nodes selected by at least one of those ImageSets.
    pub nodes_targeted: usize,
    /// Nodes labelled as holding the image.
    pub nodes_available: usize,
    /// Nodes where pulling it failed.
    pub nodes_failed: usize,
    /// The namespaces of the ImageSets that pull it with credentials, sorted: a private image
    /// is for their pods. Empty: no ImageSet gives credentials for it.
    pub private_to: Vec<String>,
    /// Its copy in a mirror, when an ImageSet managing it mirrors it: a ready copy first, of
    /// the first such ImageSet (by namespace and name).
    pub mirror: Option<MirrorAvailability>,
    /// Every digest it is held under: by the nodes (as the ImageSets' status or the state
    /// file says), and the source digest of a mirrored copy.
    pub digests: BTreeSet<String>,
}

/// The cluster state, keyed for cheap updates. Node labels are interned: a clone shares them,
/// and the nodes themselves, with the original.
#[derive(Debug, Clone, Default)]
pub struct ClusterIndex {
    image_sets: BTreeMap<(String, String), IndexedImageSet>,
    nodes: BTreeMap<String, Arc<IndexedNode>>,
    /// Normalized references whose pulls failed, by node (from NodeImages). Read for the
    /// nodes the index knows only: a NodeImage may outlive its node for a while.
    failed: BTreeMap<String, BTreeSet<String>>,
    /// What the nodes of a state file say they hold: by normalized reference, each digest
    /// with how many nodes hold it. (In a cluster the ImageSets' status says it.)
    node_digests: BTreeMap<String, BTreeMap<String, usize>>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    registries: BTreeMap<String, RegistryHealth>,
    symbols: Symbols,
}

impl ClusterIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an ImageSet. Invalid references and selectors are kept out, never fatal.
    ///
    /// An ImageSet being deleted manages nothing: what of it workloads still require is
    /// retiring (kept on the nodes until they no longer do), and pods are not steered to it.
    ///
    /// Like every `apply_*`, `set_*` and `delete_*`, it tells whether the index changed: a
    /// Node's heartbeat or an ImageSet's status update changes nothing the index holds.
    pub fn apply_image_set(&mut self, set: &ImageSet) -> bool {
        let namespace = set.metadata.namespace.clone().unwrap_or_default();
        let name = set.metadata.name.clone().unwrap_or_default();
        if set.metadata.deletion_timestamp.is_some() {
            return self.image_sets.remove(&(namespace, name)).is_some();
        }
        let images = set
            .spec
            .images
            .iter()
            .filter_map(|raw| ImageReference::parse(raw).ok())
            .collect();
        let selector = Selector::new(set.spec.node_selector.as_ref()).ok();
        let copies = match &set.spec.mirror {
            Some(mirror) => set
                .status
                .iter()
                .flat_map(|status| &status.images)
                .filter_map(|image| {
                    let copy = image.mirror.as_ref().filter(|c| !c.reference.is_empty())?;
                    Some((
                        image.normalized.clone(),
                        IndexedCopy {
                            registry: mirror.registry.clone(),
                            reference: copy.reference.clone(),
                            digest: copy.digest.clone(),
                            source_digest: copy.source_digest.clone(),
                            mirrored: copy.state == crate::api::MirrorState::Mirrored,
                        },
                    ))
                })
                .collect(),
            None => BTreeMap::new(),
        };
        let digests = set
            .status
            .iter()
            .flat_map(|status| &status.images)
            .filter_map(|image| {
                let digests: BTreeSet<String> = if image.digests.is_empty() {
                    image.digest.iter().cloned().collect()
                } else {
                    image.digests.iter().cloned().collect()
                };
                (!digests.is_empty()).then(|| (image.normalized.clone(), digests))
            })
            .collect();
        let indexed = IndexedImageSet {
            images,
            selector,
            credentials: !set.spec.image_pull_secrets.is_empty(),
            copies,
            digests,
        };
        let key = (namespace, name);
        if self.image_sets.get(&key) == Some(&indexed) {
            return false;
        }
        self.image_sets.insert(key, indexed);
        true
    }

    pub fn delete_image_set(&mut self, namespace: &str, name: &str) -> bool {
        self.image_sets
            .remove(&(namespace.to_string(), name.to_string()))
            .is_some()
    }

    /// Adds or replaces a Registry: its endpoint and whether its last probe answered.
    pub fn apply_registry(&mut self, registry: &crate::api::Registry) -> bool {
        let Some(name) = registry.metadata.name.clone() else {
            return false;
        };
        let health = RegistryHealth {
            endpoint: registry.spec.endpoint.clone(),
            reachable: registry
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .any(|c| c.type_ == "Reachable" && c.status == "True"),
        };
        if self.registries.get(&name) == Some(&health) {
            return false;
        }
        self.registries.insert(name, health);
        true
    }

    pub fn delete_registry(&mut self, name: &str) -> bool {
        self.registries.remove(name).is_some()
    }

    /// Every Registry, by name.
    pub fn registries(&self) -> &BTreeMap<String, RegistryHealth> {
        &self.registries
    }

    /// The source image of every mirror reference the ImageSets record, both normalized: a
    /// pod that runs a mirror reference runs its source image.
    pub fn mirror_sources(&self) -> BTreeMap<String, String> {
        self.image_sets
            .values()
            .flat_map(|set| &set.copies)
            .filter_map(|(source, copy)| {
                let mirror = ImageReference::parse(&copy.reference).ok()?;
                Some((mirror.to_string(), source.clone()))
            })
            .collect()
    }

    /// Adds or replaces a node's labels, keeping its taints.
    pub fn apply_node<K: AsRef<str>, V: AsRef<str>>(
        &mut self,
        name: &str,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> bool {
        let symbols = &mut self.symbols;
        let labels = Labels::from_syms(
            labels
                .into_iter()
                .map(|(k, v)| (symbols.intern(k.as_ref()), symbols.intern(v.as_ref())))
                .collect(),
        );
        if self
            .nodes
            .get(name)
            .is_some_and(|node| node.labels == labels)
        {
            return false;
        }
        self.node_mut(name).labels = labels;
        true
    }

    fn node_mut(&mut self, name: &str) -> &mut IndexedNode {
        // Looked up first: inserting by entry would allocate the name on every update.
        if !self.nodes.contains_key(name) {
            self.nodes.insert(name.to_string(), Arc::default());
        }
        match self.nodes.get_mut(name) {
            Some(node) => Arc::make_mut(node),
            None => unreachable!("inserted above"),
        }
    }

    /// Adds what one node of a state file holds: a digest per normalized reference.
    pub fn add_node_digests(&mut self, digests: impl IntoIterator<Item = (String, String)>) {
        for (normalized, digest) in digests {
            *self
                .node_digests
                .entry(normalized)
                .or_default()
                .entry(digest)
                .or_insert(0) += 1;
        }
    }

    /// Records the images whose pulls failed on a node (what its NodeImage says).
    pub fn set_node_failures(&mut self, name: &str, failed: BTreeSet<String>) -> bool {
        if failed.is_empty() {
            return self.failed.remove(name).is_some();
        }
        if self.failed.get(name) == Some(&failed) {
            return false;
        }
        self.failed.insert(name.to_string(), failed);
        true
    }

    /// Records a node's taints and whether it is cordoned.
    pub fn set_node_scheduling(
        &mut self,
        name: &str,
        taints: Vec<NodeTaint>,
        unschedulable: bool,
    ) -> bool {
        if self
            .nodes
            .get(name)
            .is_some_and(|node| node.taints == taints && node.unschedulable == unschedulable)
        {
            return false;
        }
        let node = self.node_mut(name);
        node.taints = taints;
        node.unschedulable = unschedulable;
        true
    }

    /// Forgets a node; what its NodeImage said stays until the NodeImage goes.
    pub fn delete_node(&mut self, name: &str) -> bool {
        self.nodes.remove(name).is_some()
    }

    /// Forgets the strings no node label uses any more.
    pub fn prune_symbols(&mut self) {
        self.symbols.prune();
    }

    pub fn apply_namespace(&mut self, name: &str, labels: BTreeMap<String, String>) -> bool {
        if self.namespaces.get(name) == Some(&labels) {
            return false;
        }
        self.namespaces.insert(name.to_string(), labels);
        true
    }

    pub fn delete_namespace(&mut self, name: &str) -> bool {
        self.namespaces.remove(name).is_some()
    }

    /// Labels of a namespace, when the index knows it.
    pub fn namespace_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(name)
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The nodes indexed for placement questions.
    pub fn placement(&self) -> Placement {
        Placement::new(self.nodes.iter().map(|(name, node)| PlacementNode {
            name,
            labels: &node.labels,
            taints: &node.taints,
            unschedulable: node.unschedulable,
        }))
        .with_mirrors(self.mirror_sources())
        .with_managed(
            self.image_sets
                .values()
                .flat_map(|set| &set.images)
                .map(ToString::to_string),
        )
    }

    /// For each Coral image label key, the number of nodes labelled as holding the image.
    pub fn label_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        let mut by_sym: std::collections::HashMap<&Sym, usize> = std::collections::HashMap::new();
        for node in self.nodes.values() {
            for (key, value) in node.labels.syms() {
                if &**value == LABEL_AVAILABLE {
                    *by_sym.entry(key).or_insert(0) += 1;
                }
            }
        }
        for (key, count) in by_sym {
            if is_image_label(key) {
                counts.insert(key.to_string(), count);
            }
        }
        counts
    }

    /// The normalized reference of every managed image, by its label key.
    pub fn images_by_label(&self) -> BTreeMap<String, String> {
        self.image_sets
            .values()
            .flat_map(|set| &set.images)
            .map(|image| (label_key(image), image.to_string()))
            .collect()
    }

    /// Availability of every managed image, by normalized reference.
    pub fn image_availability(&self) -> BTreeMap<String, ImageAvailability> {
        let nodes: Vec<&IndexedNode> = self.nodes.values().map(|node| &**node).collect();
        let label_counts = self.label_counts();

        // Which nodes each ImageSet targets, computed once per set.
        let mut targets: Vec<Vec<bool>> = Vec::with_capacity(self.image_sets.len());
        let mut managed: BTreeMap<String, (ImageAvailability, Vec<usize>)> = BTreeMap::new();
        for ((namespace, name), set) in &self.image_sets {
            let set_index = targets.len();
            targets.push(
                nodes
                    .iter()
                    .map(|node| {
                        set.selector
                            .as_ref()
                            .is_some_and(|s| s.matches(&node.labels))
                    })
                    .collect(),
            );
            for image in &set.images {
                let (entry, sets) = managed.entry(image.to_string()).or_insert_with(|| {
                    (
                        ImageAvailability {
                            label: label_key(image),
                            ..ImageAvailability::default()
                        },
                        Vec::new(),
                    )
                });
                entry.image_sets.push(format!("{namespace}/{name}"));
                if set.credentials && !entry.private_to.contains(namespace) {
                    entry.private_to.push(namespace.clone());
                }
                if let Some(digests) = set.digests.get(&image.to_string()) {
                    entry.digests.extend(digests.iter().cloned());
                }
                if let Some(copy) = set.copies.get(&image.to_string()) {
                    if copy.mirrored
                        && let Some(digest) = &copy.source_digest
                    {
                        entry.digests.insert(digest.clone());
                    }
                    let ready = copy.mirrored
                        && self
                            .registries
                            .get(&copy.registry)
                            .is_some_and(|r| r.reachable);
                    if entry.mirror.as_ref().is_none_or(|m| ready && !m.ready) {
                        entry.mirror = Some(MirrorAvailability {
                            reference: copy.reference.clone(),
                            digest: copy.digest.clone(),
                            registry: copy.registry.clone(),
                            ready,
                        });
                    }
                }
                sets.push(set_index);
            }
        }

        managed
            .into_iter()
            .map(|(normalized, (mut entry, sets))| {
                entry.private_to.sort_unstable();
                entry.nodes_targeted = (0..nodes.len())
                    .filter(|&n| sets.iter().any(|&s| targets[s][n]))
                    .count();
                entry.nodes_available = label_counts.get(&entry.label).copied().unwrap_or(0);
                if let Some(digests) = self.node_digests.get(&normalized) {
                    entry.digests.extend(digests.keys().cloned());
                }
                entry.nodes_failed = self
                    .failed
                    .iter()
                    .filter(|(node, failed)| {
                        failed.contains(&normalized) && self.nodes.contains_key(*node)
                    })
                    .count();
                (normalized, entry)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
