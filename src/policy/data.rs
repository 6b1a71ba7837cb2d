//! The `data.coral` document: managed images, node label counts and settings. Built once per
//! change of the cluster state and shared by every decision.

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
