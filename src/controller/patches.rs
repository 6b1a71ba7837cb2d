//! The patches a reconcile writes (the finalizer, the status) and the labels a deleted
//! ImageSet leaves to nobody: pure functions of the ImageSets.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::api::{ImageSet, ImageSetStatus};
use crate::image::{ImageReference, label_key};

/// The finalizer the controller puts on every ImageSet.
pub const FINALIZER: &str = "coral.dev/cleanup";

/// The merge patch writing a status. An empty `retiring` is written as null: a merge patch
/// leaves alone a field it does not name, and the list would stay.
pub fn status_patch(status: &ImageSetStatus) -> Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if status.retiring.is_empty()
        && let Some(fields) = value.as_object_mut()
    {
        fields.insert("retiring".into(), Value::Null);
    }
    json!({ "status": value })
}

/// The JSON patch adding the finalizer.
pub fn add_finalizer_patch(set: &ImageSet) -> Value {
    match &set.metadata.finalizers {
        None => json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]),
        Some(current) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
    }
}

/// The JSON patch removing the finalizer, if it is there.
pub fn remove_finalizer_patch(set: &ImageSet) -> Option<Value> {
    let index = set
        .metadata
        .finalizers
        .as_ref()?
        .iter()
        .position(|f| f == FINALIZER)?;
    Some(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]))
}

pub(super) fn has_finalizer(set: &ImageSet) -> bool {
    set.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// The ImageSets of `all` other than `set` that are not being deleted.
pub fn other_live_sets<'a>(
    set: &'a ImageSet,
    all: &'a [&'a ImageSet],
) -> impl Iterator<Item = &'a ImageSet> + 'a {
    all.iter().copied().filter(move |other| {
        other.metadata.deletion_timestamp.is_none()
            && (other.metadata.namespace != set.metadata.namespace
                || other.metadata.name != set.metadata.name)
    })
}

/// Label keys of `set`'s images that no other live ImageSet wants.
pub fn orphan_labels(set: &ImageSet, all: &[&ImageSet]) -> BTreeSet<String> {
    let labels = |s: &ImageSet| -> BTreeSet<String> {
        s.spec
            .images
            .iter()
            .filter_map(|i| ImageReference::parse(i).ok())
            .map(|r| label_key(&r))
            .collect()
    };
    let wanted_elsewhere: BTreeSet<String> = other_live_sets(set, all).flat_map(&labels).collect();
    labels(set)
        .into_iter()
        .filter(|l| !wanted_elsewhere.contains(l))
        .collect()
}
