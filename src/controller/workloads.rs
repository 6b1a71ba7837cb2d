//! The workloads the controller watches, to know which image labels their pod templates
//! require: Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs
//! and CronJobs. Each is kept with only what scheduling reads (its identity, owners, and its
//! pod template's nodeSelector, node affinity, tolerations and nodeName); bare Pods are left
//! to `coral audit`, so memory follows the number of workloads, not of pods.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Affinity, PodSpec, PodTemplateSpec, ReplicationController};
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::Notify;

use crate::cluster::strip_metadata;

/// Keeps of a pod template what placement reads.
pub fn strip_template(template: &mut PodTemplateSpec) {
    template.metadata = None;
    template.spec = template.spec.take().map(|spec| PodSpec {
        node_selector: spec.node_selector,
        affinity: spec.affinity.map(|affinity| Affinity {
            node_affinity: affinity.node_affinity,
            ..Affinity::default()
        }),
        tolerations: spec.tolerations,
        node_name: spec.node_name,
        ..PodSpec::default()
    });
}

/// The reflectors' stores, one per kind.
pub struct Workloads {
    deployments: Store<Deployment>,
    stateful_sets: Store<StatefulSet>,
    daemon_sets: Store<DaemonSet>,
    replica_sets: Store<ReplicaSet>,
    replication_controllers: Store<ReplicationController>,
    jobs: Store<Job>,
    cron_jobs: Store<CronJob>,
}

macro_rules! watch_kind {
    ($client:expr, $changed:expr, $kind:ty, $resource:literal, |$object:ident| $strip:block) => {{
        let (store, writer) = reflector::store::<$kind>();
        let changed = $changed.clone();
        crate::cluster::spawn_watch(
            $resource,
            watcher(
                Api::<$kind>::all($client.clone()),
                crate::cluster::watch_config(),
            )
            .default_backoff()
            .modify(|$object: &mut $kind| {
                strip_metadata(&mut $object.metadata);
                $strip
            })
            .reflect(writer),
            move || changed.notify_one(),
            || {},
        );
        store
    }};
}

impl Workloads {
    /// Starts one reflector per kind; each change notifies `changed`.
    pub fn watch(client: &Client, changed: &Arc<Notify>) -> Self {
        Self {
            deployments: watch_kind!(client, changed, Deployment, "deployments", |d| {
                d.status = None;
                if let Some(spec) = d.spec.as_mut() {
                    strip_template(&mut spec.template);
                }
            }),
            stateful_sets: watch_kind!(client, changed, StatefulSet, "statefulsets", |s| {
                s.status = None;
                if let Some(spec) = s.spec.as_mut() {
                    strip_template(&mut spec.template);
                    spec.volume_claim_templates = None;
                }
            }),
            daemon_sets: watch_kind!(client, changed, DaemonSet, "daemonsets", |d| {
                d.status = None;
                if let Some(spec) = d.spec.as_mut() {
                    strip_template(&mut spec.template);
                }
            }),
            replica_sets: watch_kind!(client, changed, ReplicaSet, "replicasets", |r| {
                r.status = None;
                if let Some(template) = r.spec.as_mut().and_then(|s| s.template.as_mut()) {
                    strip_template(template);
                }
            }),
            replication_controllers: watch_kind!(
                client,
                changed,
                ReplicationController,
                "replicationcontrollers",
                |r| {
                    r.status = None;
                    if let Some(template) = r.spec.as_mut().and_then(|s| s.template.as_mut()) {
                        strip_template(template);
                    }
                }
            ),
            jobs: watch_kind!(client, changed, Job, "jobs", |j| {
                j.status = None;
                if let Some(spec) = j.spec.as_mut() {
                    strip_template(&mut spec.template);
                }
            }),
            cron_jobs: watch_kind!(client, changed, CronJob, "cronjobs", |c| {
                c.status = None;
                if let Some(template) = c
                    .spec
                    .as_mut()
                    .and_then(|s| s.job_template.spec.as_mut())
                    .map(|s| &mut s.template)
                {
                    strip_template(template);
                }
            }),
        }
    }

    /// Waits until every kind is listed.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.deployments.wait_until_ready().await?;
        self.stateful_sets.wait_until_ready().await?;
        self.daemon_sets.wait_until_ready().await?;
        self.replica_sets.wait_until_ready().await?;
        self.replication_controllers.wait_until_ready().await?;
        self.jobs.wait_until_ready().await?;
        self.cron_jobs.wait_until_ready().await?;
        Ok(())
    }

    /// Every workload as JSON (`apiVersion` and `kind` included), as placement reads objects.
    pub fn values(&self) -> Vec<Value> {
        fn all<K: serde::Serialize + Clone + kube::Resource + 'static>(
            store: &Store<K>,
            into: &mut Vec<Value>,
        ) where
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            into.extend(
                store
                    .state()
                    .iter()
                    .filter_map(|object| serde_json::to_value(object.as_ref()).ok()),
            );
        }
        let mut values = Vec::new();
        all(&self.deployments, &mut values);
        all(&self.stateful_sets, &mut values);
        all(&self.daemon_sets, &mut values);
        all(&self.replica_sets, &mut values);
        all(&self.replication_controllers, &mut values);
        all(&self.jobs, &mut values);
        all(&self.cron_jobs, &mut values);
        values
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_stripped_template_keeps_what_scheduling_reads() {
        let mut template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}, "annotations": {"big": "x"}},
            "spec": {
                "containers": [{"name": "web", "image": "nginx:1.27", "env": [{"name": "A", "value": "b"}]}],
                "nodeSelector": {"pool": "web"},
                "nodeName": "a",
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "affinity": {
                    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    ]}},
                    "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "x"}]},
                },
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        }))
        .expect("template");
        strip_template(&mut template);
        assert_eq!(
            serde_json::to_value(&template).expect("json"),
            json!({"spec": {
                "containers": [],
                "nodeSelector": {"pool": "web"},
                "nodeName": "a",
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                ]}}},
            }})
        );
    }
}
