//! Building the index from the objects the cluster watches hold.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{ClusterIndex, NodeTaint};
use crate::api::{ImageSet, ImageState, NodeImage};
use crate::image::ImageReference;

/// The objects an index is built from, as the watches hold them. Namespaces are metadata
/// only; of a Node the index reads its labels, taints and `spec.unschedulable`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClusterObjects<'a> {
    pub image_sets: &'a [&'a ImageSet],
    pub nodes: &'a [&'a Node],
    pub namespaces: &'a [&'a ObjectMeta],
    pub node_images: &'a [&'a NodeImage],
}

impl ClusterIndex {
    /// The index of a set of cluster objects. A NodeImage whose node is not known counts for
    /// nothing (its node was deleted and garbage collection has not caught up).
    pub fn from_objects(objects: ClusterObjects<'_>) -> Self {
        let mut index = Self::new();
        for set in objects.image_sets {
            index.apply_image_set(set);
        }
        for node in objects.nodes {
            index.apply_node_object(node);
        }
        for namespace in objects.namespaces {
            if let Some(name) = &namespace.name {
                index.apply_namespace(name, labels(namespace));
            }
        }
        for node_image in objects.node_images {
            index.apply_node_image(node_image);
        }
        index
    }

    /// Adds or replaces a Node: its labels, taints and `spec.unschedulable`.
    pub fn apply_node_object(&mut self, node: &Node) {
        if let Some(name) = &node.metadata.name {
            let spec = node.spec.as_ref();
            self.apply_node_fields(
                name,
                node.metadata.labels.iter().flatten(),
                spec.and_then(|spec| spec.taints.as_deref())
                    .unwrap_or_default(),
                spec.and_then(|spec| spec.unschedulable) == Some(true),
            );
        }
    }

    /// Adds or replaces a node from the fields of a Node the index reads.
    pub fn apply_node_fields<'a>(
        &mut self,
        name: &str,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
        taints: &[Taint],
        unschedulable: bool,
    ) -> bool {
        let labels_changed = self.apply_node(name, labels);
        let taints = taints
            .iter()
            .map(|taint| NodeTaint {
                key: taint.key.clone(),
                value: taint.value.clone().unwrap_or_default(),
                effect: taint.effect.clone(),
            })
            .collect();
        // Both: a new node needs both recorded.
        self.set_node_scheduling(name, taints, unschedulable) | labels_changed
    }

    /// Records what a NodeImage says of its node: the images whose pulls failed there.
    pub fn apply_node_image(&mut self, node_image: &NodeImage) {
        let failed: BTreeSet<String> = node_image
            .status
            .iter()
            .flat_map(|status| &status.images)
            .filter(|entry| entry.state == ImageState::Failed)
            .filter_map(|entry| ImageReference::parse(&entry.image).ok())
            .map(|reference| reference.to_string())
            .collect();
        self.set_node_failures(&node_image.spec.node_name, failed);
    }

    /// Number of ImageSets.
    pub fn image_set_count(&self) -> usize {
        self.image_sets.len()
    }

    /// Number of namespaces.
    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }
}

fn labels(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}
