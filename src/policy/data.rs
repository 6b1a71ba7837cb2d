//! The `data.coral` document: managed images, node label counts and settings. Built once per
//! change of the cluster state and shared by every decision.
//!
//! An image is `private` when an ImageSet pulls it with `imagePullSecrets`; `namespaces` are
//! then the namespaces of those ImageSets, whose pods may use it.

use serde_json::{Map, Value, json};

use super::Settings;
use crate::index::ClusterIndex;

/// `{"coral": {"images": …, "nodes": …, "settings": …}}` for the given state.
pub fn coral_data(index: &ClusterIndex, settings: &Settings) -> Value {
    let images: Map<String, Value> = index
        .image_availability()
        .into_iter()
        .map(|(normalized, image)| {
            let value = json!({
                "label": image.label,
                "imageSets": image.image_sets,
                "private": !image.private_to.is_empty(),
                "namespaces": image.private_to,
                "nodes": {
                    "targeted": image.nodes_targeted,
                    "available": image.nodes_available,
                    "failed": image.nodes_failed,
                },
            });
            (normalized, value)
        })
        .collect();
    json!({
        "coral": {
            "images": images,
            "nodes": {
                "total": index.node_count(),
                "labels": index.label_counts(),
            },
            "settings": settings,
        }
    })
}
