//! The `data.coral` document: managed images, node label counts and settings. Built once per
//! change of the cluster state and shared by every decision.
//!
//! An image is `private` when an ImageSet pulls it with `imagePullSecrets`; `namespaces` are
//! then the namespaces of those ImageSets, whose pods may use it.
//!
//! `digests` are the digests an image is held under, by the nodes and (its source digest) by
//! the mirror; `digest` is the one digest when they agree, else null.
//!
//! An image an ImageSet mirrors has `mirror: {reference, digest, registry, ready}` (`ready`:
//! the mirror holds it and its Registry answered the controller's last probe);
//! `registries` has each Registry's endpoint and reachability, and `mirrors` the source image
//! of every mirror reference, so that a pod already rewritten to its mirror runs the same
//! image.

use serde_json::{Map, Value, json};

use super::Settings;
use crate::index::ClusterIndex;

/// `{"coral": {"images": …, "nodes": …, "registries": …, "mirrors": …, "settings": …}}` for
/// the given state.
pub fn coral_data(index: &ClusterIndex, settings: &Settings) -> Value {
    let images: Map<String, Value> = index
        .image_availability()
        .into_iter()
        .map(|(normalized, image)| {
            // Pinned only to a digest every holder agrees on.
            let agreed = (image.digests.len() == 1)
                .then(|| image.digests.first().cloned())
                .flatten();
            let value = json!({
                "label": image.label,
                "digest": agreed,
                "digests": image.digests,
                "imageSets": image.image_sets,
                "private": !image.private_to.is_empty(),
                "namespaces": image.private_to,
                "nodes": {
                    "targeted": image.nodes_targeted,
                    "available": image.nodes_available,
                    "failed": image.nodes_failed,
                },
            });
            let value = match image.mirror {
                Some(mirror) => {
                    let mut value = value;
                    value["mirror"] = json!({
                        "reference": mirror.reference,
                        "digest": mirror.digest,
                        "registry": mirror.registry,
                        "ready": mirror.ready,
                    });
                    value
                }
                None => value,
            };
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
            "registries": index.registries(),
            "mirrors": index.mirror_sources(),
            "settings": settings,
        }
    })
}
