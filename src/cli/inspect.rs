//! `coral status`, `coral why` and `coral nodes`: questions about the cluster of the kubeconfig,
//! answered from the live objects. Installed as `kubectl-coral`, the binary is a kubectl plugin:
//! `kubectl coral status`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ReplicationController};
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::Value;

use super::audit::list_all;
use coral::api::{ImageSet, NodeImage};
use coral::image::{ImageReference, label_key};
use coral::index::{ClusterIndex, ClusterObjects};
use coral::policy::{CompiledPolicies, EvaluatorOptions, PolicyRequest, PolicySet, Snapshot};
use coral::webhook::ObjectName;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only the ImageSets of this namespace. Default: every namespace.
    #[arg(short, long, env = "CORAL_NAMESPACE")]
    namespace: Option<String>,
}

#[derive(Debug, Args)]
pub struct WhyArgs {
    /// The object: NAME (a Pod) or TYPE/NAME, TYPE one of pod, deployment, statefulset,
    /// daemonset, replicaset, replicationcontroller, job, cronjob (or their plurals and short
    /// names).
    #[arg(value_name = "[TYPE/]NAME")]
    object: String,
    /// Its namespace.
    #[arg(short, long, default_value = "default", env = "CORAL_NAMESPACE")]
    namespace: String,
    #[command(flatten)]
    policies_configmap: super::PoliciesConfigMapArg,
}

#[derive(Debug, Args)]
pub struct NodesArgs {
    /// The image, such as nginx:1.27.
    #[arg(value_name = "IMAGE")]
    image: String,
}

fn block_on<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

/// `coral status`: every ImageSet, its readiness and, per image, the nodes holding it.
pub fn status(args: StatusArgs) -> Result<ExitCode> {
    let text = block_on(async {
        let client = coral::cluster::client().await?;
        let api: Api<ImageSet> = match &args.namespace {
            Some(namespace) => Api::namespaced(client, namespace),
            None => Api::all(client),
        };
        Ok(render_status(&list_all(api, "imagesets").await?))
    })?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn render_status(sets: &[ImageSet]) -> String {
    if sets.is_empty() {
        return "no ImageSets\n".to_string();
    }
    let mut out = String::new();
    for set in sets {
        let status = set.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map_or("Ready: unknown (no status yet)".to_string(), |c| {
                format!("Ready: {} ({})", c.status, c.message)
            });
        let _ = writeln!(
            out,
            "{}/{}  {ready}",
            set.namespace().unwrap_or_default(),
            set.name_any()
        );
        for image in &status.images {
            let _ = writeln!(
                out,
                "  {:<48} {:>3}/{:<3} nodes  {} pulling  {} failed",
                image.image,
                image.nodes_available,
                image.nodes_targeted,
                image.nodes_pulling,
                image.nodes_failed
            );
        }
    }
    out
}

/// `coral nodes IMAGE`: which nodes hold an image, which pull it, and why pulls failed.
pub fn nodes(args: NodesArgs) -> Result<ExitCode> {
    let reference = ImageReference::parse(&args.image)?;
    let text = block_on(async {
        let client = coral::cluster::client().await?;
        let nodes: Vec<Node> = list_all(Api::all(client.clone()), "nodes").await?;
        let node_images: Vec<NodeImage> = list_all(Api::all(client), "nodeimages").await?;
        Ok(render_nodes(&reference, &nodes, &node_images))
    })?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn render_nodes(reference: &ImageReference, nodes: &[Node], node_images: &[NodeImage]) -> String {
    let key = label_key(reference);
    let normalized = reference.to_string();
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for node in nodes {
        if node.labels().get(&key).map(String::as_str) == Some(coral::image::LABEL_AVAILABLE) {
            rows.insert(node.name_any(), "available".to_string());
        }
    }
    for node_image in node_images {
        let Some(status) = &node_image.status else {
            continue;
        };
        for entry in status.images.iter().filter(|e| e.image == normalized) {
            let state = serde_json::to_value(entry.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let detail = match &entry.last_error {
                Some(error) if state != "available" => {
                    format!("{state} after {} attempt(s): {error}", entry.attempts)
                }
                _ => state,
            };
            rows.entry(node_image.name_any()).or_insert(detail);
        }
    }
    let mut out = format!("{normalized}  label {key}\n");
    if rows.is_empty() {
        out.push_str("  no node holds it, pulls it or failed to pull it\n");
    }
    let held = rows.values().filter(|d| *d == "available").count();
    for (node, detail) in &rows {
        let _ = writeln!(out, "  {node:<32} {detail}");
    }
    let _ = writeln!(out, "{held} of {} node(s) hold it", nodes.len());
    out
}

/// `coral why [TYPE/]NAME`: the live policies on the live object against the live state: what
/// Coral would change, the policies' reasons, and what the cluster knows of each image.
pub fn why(args: WhyArgs) -> Result<ExitCode> {
    let text = block_on(async {
        let client = coral::cluster::client().await?;
        let object = live_object(&client, &args.object, &args.namespace).await?;
        let (index, set) = live_state(&client, &args.policies_configmap.name).await?;
        explain(object, &args.namespace, index, &set)
    })?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

async fn live_object(client: &Client, object: &str, namespace: &str) -> Result<Value> {
    let (kind, name) = object.split_once('/').unwrap_or(("pod", object));
    macro_rules! get {
        ($type:ty) => {{
            let api: Api<$type> = Api::namespaced(client.clone(), namespace);
            let found = api
                .get(name)
                .await
                .with_context(|| format!("cannot read {kind}/{name} in namespace {namespace}"))?;
            serde_json::to_value(found)?
        }};
    }
    Ok(match kind.to_ascii_lowercase().as_str() {
        "pod" | "pods" | "po" => get!(Pod),
        "deployment" | "deployments" | "deploy" => get!(Deployment),
        "statefulset" | "statefulsets" | "sts" => get!(StatefulSet),
        "daemonset" | "daemonsets" | "ds" => get!(DaemonSet),
        "replicaset" | "replicasets" | "rs" => get!(ReplicaSet),
        "replicationcontroller" | "replicationcontrollers" | "rc" => get!(ReplicationController),
        "job" | "jobs" => get!(Job),
        "cronjob" | "cronjobs" | "cj" => get!(CronJob),
        other => bail!(
            "{other:?} is not a kind Coral decides: use pod, deployment, statefulset, daemonset, replicaset, replicationcontroller, job or cronjob"
        ),
    })
}

/// The cluster as the webhook sees it, and the policies it serves.
async fn live_state(client: &Client, configmap: &ObjectName) -> Result<(ClusterIndex, PolicySet)> {
    let image_sets: Vec<ImageSet> = list_all(Api::all(client.clone()), "imagesets").await?;
    let nodes: Vec<Node> = list_all(Api::all(client.clone()), "nodes").await?;
    let node_images: Vec<NodeImage> = list_all(Api::all(client.clone()), "nodeimages").await?;
    let namespaces: Vec<Namespace> = list_all(Api::all(client.clone()), "namespaces").await?;
    let set = match Api::<ConfigMap>::namespaced(client.clone(), &configmap.namespace)
        .get_opt(&configmap.name)
        .await
        .with_context(|| format!("cannot read the policy ConfigMap {configmap}"))?
    {
        Some(found) => PolicySet::from_configmap(&found, &format!("configmap {configmap}"))?,
        None => PolicySet::embedded(),
    };
    let image_sets: Vec<&ImageSet> = image_sets.iter().collect();
    let nodes: Vec<&Node> = nodes.iter().collect();
    let node_images: Vec<&NodeImage> = node_images.iter().collect();
    let namespaces: Vec<_> = namespaces.iter().map(|n| &n.metadata).collect();
    let index = ClusterIndex::from_objects(ClusterObjects {
        image_sets: &image_sets,
        nodes: &nodes,
        namespaces: &namespaces,
        node_images: &node_images,
    });
    Ok((index, set))
}

fn explain(object: Value, namespace: &str, index: ClusterIndex, set: &PolicySet) -> Result<String> {
    let request = PolicyRequest::create(object, namespace)?;
    let availability = index.image_availability();
    let node_count = index.node_count();
    let compiled = CompiledPolicies::compile(set)?;
    let snapshot = Snapshot::new(&compiled, index, None, EvaluatorOptions::default())?;
    let decision = snapshot.decide(&request)?;
    let mut out = format!("policies: {}\n", snapshot.policy_origin);
    out.push_str(&super::policy::render_diff(&request, &decision)?);
    out.push_str("images:\n");
    let kind = request.workload_kind()?;
    let mut seen = std::collections::BTreeSet::new();
    for container in coral::policy::containers(&request.object, kind) {
        let Some(image) = container["image"].as_str() else {
            continue;
        };
        if !seen.insert(image.to_string()) {
            continue;
        }
        let line = match ImageReference::parse(image) {
            Err(error) => format!("not a valid reference: {error}"),
            Ok(reference) => match availability.get(&reference.to_string()) {
                None => "unmanaged: no ImageSet names it".to_string(),
                Some(found) => {
                    let mut line = format!(
                        "managed by {}; on {} of {} targeted node(s) ({} node(s) in the cluster)",
                        found.image_sets.join(", "),
                        found.nodes_available,
                        found.nodes_targeted,
                        node_count
                    );
                    if found.nodes_failed > 0 {
                        let _ = write!(line, "; failed on {}", found.nodes_failed);
                    }
                    if !found.private_to.is_empty() {
                        let _ = write!(line, "; private to {}", found.private_to.join(", "));
                    }
                    line
                }
            },
        };
        let _ = writeln!(out, "  {image}: {line}");
    }
    Ok(out)
}
