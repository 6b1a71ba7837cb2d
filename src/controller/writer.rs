//! The API calls of a reconcile: finalizer, status, Events, label cleanup, stranded
//! workloads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use anyhow::Context;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::aggregate::{Aggregator, Problems, image_set_status, transitions, with_drift};
use super::mirroring::with_mirror;
use super::patches::{
    add_finalizer_patch, has_finalizer, orphan_labels, remove_finalizer_patch, status_patch,
};
use super::retiring::{LabelUsers, with_retiring};
use super::{CertTargets, ControllerOptions, certs, retiring};
use crate::api::{ImageMirrorStatus, ImageSet};
use crate::index::{ClusterIndex, Stranded, stranded_workload};
use crate::metrics::ControllerMetrics;
use crate::policy::WorkloadKind;

/// The API calls of a reconcile.
pub struct Writer {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
}

/// What a reconcile of one ImageSet did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub finalizer_added: bool,
    pub finalizer_removed: bool,
    pub status_patched: bool,
    pub labels_removed: usize,
    pub events: usize,
}

impl Writer {
    fn image_sets(&self, set: &ImageSet) -> Api<ImageSet> {
        Api::namespaced(
            self.client.clone(),
            set.metadata.namespace.as_deref().unwrap_or_default(),
        )
    }

    /// Reconciles one ImageSet: its finalizer, its status (patched only when it changed),
    /// the Events of its transitions, and, while it is being deleted, the cleanup of labels
    /// no other ImageSet needs.
    #[allow(clippy::too_many_arguments)] // the reconcile's inputs, each read once
    pub async fn reconcile(
        &self,
        set: &ImageSet,
        all: &[&ImageSet],
        aggregator: &Mutex<Aggregator>,
        problems: &Problems,
        users: &LabelUsers,
        copies: &BTreeMap<String, ImageMirrorStatus>,
        options: &ControllerOptions,
        now: Timestamp,
    ) -> Result<Outcome, kube::Error> {
        let mut outcome = Outcome::default();
        let name = set.name_any();
        let api = self.image_sets(set);
        let retiring = retiring::retiring_images(set, all, users);
        if set.metadata.deletion_timestamp.is_some() {
            if has_finalizer(set) {
                // What is still retiring keeps the finalizer, and its labels on the nodes.
                let releasing = retiring.is_empty();
                let previous = set.status.clone().unwrap_or_default();
                let status = with_retiring(
                    previous.clone(),
                    retiring,
                    users,
                    set.status.as_ref(),
                    &Time(now),
                );
                if status != previous {
                    api.patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(status_patch(&status)),
                    )
                    .await?;
                    outcome.status_patched = true;
                }
                if releasing {
                    self.finalize(set, all, aggregator, options, now, &mut outcome)
                        .await?;
                }
            }
            return Ok(outcome);
        }
        if !has_finalizer(set) {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::<()>::Json(
                    serde_json::from_value(add_finalizer_patch(set)).unwrap_or_default(),
                ),
            )
            .await?;
            outcome.finalizer_added = true;
        }
        let (status, notices) = {
            let aggregator = aggregator.lock().unwrap_or_else(PoisonError::into_inner);
            let namespace = set.metadata.namespace.as_deref().unwrap_or_default();
            let Some(summary) = aggregator.summary(namespace, &name) else {
                return Ok(outcome);
            };
            let status = with_retiring(
                image_set_status(
                    set.metadata.generation,
                    &summary,
                    problems,
                    set.status.as_ref(),
                    &Time(now),
                ),
                retiring,
                users,
                set.status.as_ref(),
                &Time(now),
            );
            let status = with_mirror(status, set, copies, set.status.as_ref(), &Time(now));
            let status = with_drift(status, &summary, set.status.as_ref(), &Time(now));
            let notices = transitions(set.status.as_ref(), &status, &summary);
            (status, notices)
        };
        if set.status.as_ref() != Some(&status) {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(status_patch(&status)),
            )
            .await?;
            outcome.status_patched = true;
            let reference = set.object_ref(&());
            for notice in notices {
                let event = Event {
                    type_: if notice.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: notice.reason.to_string(),
                    note: Some(notice.message.chars().take(1000).collect()),
                    action: "Reconcile".to_string(),
                    secondary: None,
                };
                match self.recorder.publish(&event, &reference).await {
                    Ok(()) => outcome.events += 1,
                    Err(error) => warn!(%error, imageset = %name, "cannot record an Event"),
                }
            }
        }
        Ok(outcome)
    }

    async fn finalize(
        &self,
        set: &ImageSet,
        all: &[&ImageSet],
        aggregator: &Mutex<Aggregator>,
        options: &ControllerOptions,
        now: Timestamp,
        outcome: &mut Outcome,
    ) -> Result<(), kube::Error> {
        let orphans = orphan_labels(set, all);
        let carriers: Vec<(String, Vec<String>)> = {
            let aggregator = aggregator.lock().unwrap_or_else(PoisonError::into_inner);
            let mut by_node: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for label in &orphans {
                for node in aggregator.nodes_with_label(label) {
                    by_node
                        .entry(node.to_string())
                        .or_default()
                        .push(label.clone());
                }
            }
            by_node.into_iter().collect()
        };
        let name = set.name_any();
        if carriers.is_empty() {
            if let Some(patch) = remove_finalizer_patch(set) {
                self.image_sets(set)
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::<()>::Json(serde_json::from_value(patch).unwrap_or_default()),
                    )
                    .await?;
                outcome.finalizer_removed = true;
                info!(imageset = %name, "labels cleaned up; finalizer released");
            }
            return Ok(());
        }
        let deleting_since = set
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or(now, |t| t.0);
        let timeout = SignedDuration::try_from(options.cleanup_timeout).unwrap_or_default();
        if deleting_since
            .checked_add(timeout)
            .is_ok_and(|end| end > now)
        {
            // The agents remove the labels; wait for them.
            return Ok(());
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        for (node, labels) in carriers {
            let labels: serde_json::Map<String, Value> =
                labels.into_iter().map(|l| (l, Value::Null)).collect();
            nodes
                .patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await?;
            outcome.labels_removed += labels.len();
            warn!(%node, imageset = %name, "the node's agent did not remove labels in time; removed them");
        }
        Ok(())
    }

    /// Puts `ca` into the caBundle of every webhook of the named (mutating or validating)
    /// webhook configuration that lacks it; a configuration that does not exist is left be.
    async fn patch_ca_bundle<K>(&self, name: &str, ca: &str) -> anyhow::Result<()>
    where
        K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let Some(configuration) = api.get_opt(name).await? else {
            return Ok(());
        };
        if let Some(patch) = certs::ca_bundle_patch(&serde_json::to_value(&configuration)?, ca) {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::<()>::Json(serde_json::from_value(patch)?),
            )
            .await?;
            info!(configuration = %name, kind = %K::kind(&()), "caBundle updated");
        }
        Ok(())
    }

    /// Keeps the webhook certificate Secret current and its CA in the webhook configurations.
    pub async fn ensure_certs(
        &self,
        namespace: &str,
        targets: &CertTargets,
        now: Timestamp,
    ) -> anyhow::Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let current = secrets.get_opt(&targets.secret).await?;
        let dns = certs::dns_names(&targets.service, namespace);
        let renewal = certs::renewal(current.as_ref(), &dns, now);
        let secret = if renewal == certs::Renewal::None {
            current.context("the certificate Secret vanished")?
        } else {
            let issued = certs::issue(
                current.as_ref(),
                renewal,
                &dns,
                namespace,
                &targets.secret,
                now,
            )?;
            let written = match current {
                Some(_) => {
                    secrets
                        .replace(&targets.secret, &PostParams::default(), &issued)
                        .await?
                }
                None => secrets.create(&PostParams::default(), &issued).await?,
            };
            info!(secret = %targets.secret, ?renewal, "webhook certificate issued");
            written
        };
        let ca = secret
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .context("the certificate Secret has no ca.crt")?;
        self.patch_ca_bundle::<MutatingWebhookConfiguration>(&targets.mutating, &ca)
            .await?;
        self.patch_ca_bundle::<ValidatingWebhookConfiguration>(&targets.validating, &ca)
            .await?;
        Ok(())
    }
}

/// The stranded workloads among `workloads`, each with the object it was found in.
pub fn find_stranded<'a>(
    workloads: &'a [Value],
    index: &ClusterIndex,
    min_nodes: usize,
) -> Vec<(Stranded, &'a Value)> {
    let placement = index.placement();
    let images = index.images_by_label();
    workloads
        .iter()
        .filter_map(|object| {
            stranded_workload(object, &placement, &images, min_nodes).map(|found| (found, object))
        })
        .collect()
}

impl Writer {
    /// Counts stranded workloads by kind, and records a Warning Event `Stranded` on each that
    /// was not stranded in the last pass (`seen`, which this updates).
    pub async fn report_stranded(
        &self,
        found: &[(Stranded, &Value)],
        seen: &Mutex<BTreeSet<String>>,
    ) {
        for kind in WorkloadKind::ALL {
            let count = found.iter().filter(|(s, _)| s.kind == kind.name()).count();
            self.metrics
                .stranded_workloads
                .with_label_values(&[kind.name()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let now: BTreeSet<String> = found
            .iter()
            .map(|(s, _)| format!("{} {}/{}", s.kind, s.namespace, s.name))
            .collect();
        let new: Vec<&(Stranded, &Value)> = {
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            let new = found
                .iter()
                .filter(|(s, _)| !seen.contains(&format!("{} {}/{}", s.kind, s.namespace, s.name)))
                .collect();
            *seen = now;
            new
        };
        for (stranded, object) in new {
            warn!(kind = stranded.kind, namespace = %stranded.namespace, name = %stranded.name, reason = %stranded.reason(), "workload stranded");
            let text = |pointer: &str| {
                object
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let reference = ObjectReference {
                api_version: text("/apiVersion"),
                kind: Some(stranded.kind.to_string()),
                namespace: Some(stranded.namespace.clone()),
                name: Some(stranded.name.clone()),
                uid: text("/metadata/uid"),
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "Stranded".to_string(),
                note: Some(stranded.reason().chars().take(1000).collect()),
                action: "CheckPlacement".to_string(),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                warn!(%error, name = %stranded.name, "cannot record an Event on a stranded workload");
            }
        }
    }
}
