//! Images leaving Coral while workloads still require their node labels. Removing an image
//! from an ImageSet, or deleting the ImageSet, would make agents drop its label from every
//! node, and every workload whose pod template requires the label could never start a pod
//! again. Instead the image is *retiring*: listed in `status.retiring`, kept on the nodes the
//! set selects (agents treat it as wanted) and labelled, until no live workload requires the
//! label (the webhook drops the keys of unmanaged images from templates on their next update)
//! or the ImageSet is annotated `coral.dev/force-remove: "true"`. A deleted ImageSet keeps its
//! finalizer while anything of it is retiring. Pure.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::Value;

use super::aggregate::condition;
use crate::api::{FORCE_REMOVE_ANNOTATION, ImageSet, ImageSetStatus, RetiringImage};
use crate::image::{ImageReference, label_key};
use crate::index::{required_image_labels, scheduling_pod_spec, workload_name};

/// Workloads named in a retiring image's entry and in the condition.
pub const MAX_NAMED_WORKLOADS: usize = 10;

/// The condition type of an ImageSet with retiring images.
pub const RETIRING_CONDITION: &str = "Retiring";

/// Which live workloads require each image label, by label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelUsers {
    by_label: BTreeMap<String, BTreeSet<String>>,
}

impl LabelUsers {
    /// The image labels the pod templates of `workloads` require (see
    /// [`scheduling_pod_spec`] for which objects count).
    pub fn of<'a>(workloads: impl IntoIterator<Item = &'a Value>) -> Self {
        let mut by_label: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for object in workloads {
            let Some((kind, pod_spec)) = scheduling_pod_spec(object) else {
                continue;
            };
            for label in required_image_labels(pod_spec) {
                by_label
                    .entry(label.to_string())
                    .or_default()
                    .insert(workload_name(kind, object));
            }
        }
        Self { by_label }
    }

    fn users(&self, label: &str) -> Option<&BTreeSet<String>> {
        self.by_label.get(label).filter(|users| !users.is_empty())
    }
}

/// Normalized references of a list of raw ones; unparsable ones are skipped.
fn normalized<'a>(images: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    images
        .into_iter()
        .filter_map(|image| ImageReference::parse(image).ok())
        .map(|reference| reference.to_string())
        .collect()
}

/// What of `set` is retiring: the images it had (in its last status) and no longer has (all
/// of them when it is being deleted), that no other live ImageSet keeps, and whose label live
/// workloads require.
pub fn retiring_images(
    set: &ImageSet,
    all: &[&ImageSet],
    users: &LabelUsers,
) -> Vec<RetiringImage> {
    let forced = set
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FORCE_REMOVE_ANNOTATION))
        .is_some_and(|value| value == "true");
    if forced {
        return Vec::new();
    }
    let deleting = set.metadata.deletion_timestamp.is_some();
    let current = if deleting {
        BTreeSet::new()
    } else {
        normalized(&set.spec.images)
    };
    let status = set.status.as_ref();
    let had: BTreeSet<String> = status
        .into_iter()
        .flat_map(|s| {
            s.images
                .iter()
                .map(|i| &i.normalized)
                .chain(s.retiring.iter().map(|r| &r.image))
        })
        .cloned()
        .chain(if deleting {
            normalized(&set.spec.images)
        } else {
            BTreeSet::new()
        })
        .collect();
    let kept_elsewhere: BTreeSet<String> = super::other_live_sets(set, all)
        .flat_map(|other| normalized(&other.spec.images))
        .collect();
    had.into_iter()
        .filter(|image| !current.contains(image) && !kept_elsewhere.contains(image))
        .filter_map(|image| {
            let label = label_key(&ImageReference::parse(&image).ok()?);
            let users = users.users(&label)?;
            Some(RetiringImage {
                workloads: users.iter().take(MAX_NAMED_WORKLOADS).cloned().collect(),
                workload_count: i32::try_from(users.len()).unwrap_or(i32::MAX),
                image,
                label,
            })
        })
        .collect()
}

/// Puts `retiring` and its condition into a computed status; the condition is there only
/// while something is retiring.
pub fn with_retiring(
    mut status: ImageSetStatus,
    retiring: Vec<RetiringImage>,
    users: &LabelUsers,
    previous: Option<&ImageSetStatus>,
    now: &Time,
) -> ImageSetStatus {
    status.conditions.retain(|c| c.type_ != RETIRING_CONDITION);
    if !retiring.is_empty() {
        let generation = status.observed_generation;
        status.conditions.push(retiring_condition(
            &retiring, users, generation, previous, now,
        ));
    }
    status.retiring = retiring;
    status
}

fn retiring_condition(
    retiring: &[RetiringImage],
    users: &LabelUsers,
    generation: Option<i64>,
    previous: Option<&ImageSetStatus>,
    now: &Time,
) -> Condition {
    let workloads: BTreeSet<&str> = retiring
        .iter()
        .filter_map(|image| users.users(&image.label))
        .flatten()
        .map(String::as_str)
        .collect();
    let named: Vec<&str> = workloads
        .iter()
        .take(MAX_NAMED_WORKLOADS)
        .copied()
        .collect();
    let more = workloads.len() - named.len();
    let images: Vec<&str> = retiring.iter().map(|r| r.image.as_str()).collect();
    let message = format!(
        "{} left this ImageSet, but {} workload(s) still require the node label: {}{}; the images stay on the nodes, labelled, until none does (update the workloads: the webhook drops the labels of unmanaged images), or annotate the ImageSet {FORCE_REMOVE_ANNOTATION}=true to remove them now",
        images.join(", "),
        workloads.len(),
        named.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    );
    condition(
        RETIRING_CONDITION,
        "True",
        "StillRequired",
        message,
        generation,
        super::aggregate::previous_conditions(previous),
        now,
    )
}

#[cfg(test)]
mod tests;
