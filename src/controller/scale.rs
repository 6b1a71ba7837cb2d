//! A synthetic cluster for the scale test and the aggregation benchmark.

use std::collections::BTreeMap;

use super::aggregate::Aggregator;
use crate::api::ImageSet;
use crate::image::{ImageReference, label_key};

/// Image `i` of ImageSet `set`.
pub fn image(set: usize, i: usize) -> String {
    format!("registry.example.com/team-{set}/service-{i}:1.{i}")
}

/// The ImageSets: set `s` selects pool `p{s}`.
pub fn image_sets(sets: usize, images_per_set: usize) -> Vec<ImageSet> {
    (0..sets)
        .map(|s| {
            let images: Vec<String> = (0..images_per_set).map(|i| image(s, i)).collect();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": format!("set-{s}"), "namespace": "shop", "generation": 1},
                "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": format!("p{s}")}}},
            }))
            .unwrap_or_default()
        })
        .collect()
}

/// The labels of node `n`: its pool, and every image of its pool's set available.
pub fn node_labels(n: usize, sets: usize, images_per_set: usize) -> BTreeMap<String, String> {
    let pool = n % sets;
    let mut labels = BTreeMap::from([("pool".to_string(), format!("p{pool}"))]);
    for i in 0..images_per_set {
        if let Ok(reference) = ImageReference::parse(&image(pool, i)) {
            labels.insert(label_key(&reference), "available".to_string());
        }
    }
    labels
}

/// A full aggregation: `nodes` nodes, `sets` ImageSets of `images_per_set` images.
pub fn cluster(nodes: usize, sets: usize, images_per_set: usize) -> Aggregator {
    let mut aggregator = Aggregator::new();
    for set in image_sets(sets, images_per_set) {
        aggregator.apply_image_set(&set);
    }
    for n in 0..nodes {
        aggregator.apply_node_labels(&format!("node-{n}"), node_labels(n, sets, images_per_set));
    }
    aggregator
}
