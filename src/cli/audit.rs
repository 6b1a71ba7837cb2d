//! `coral audit`: workloads whose pod template requires image labels that fewer than
//! `minAvailableNodes` schedulable nodes satisfy, against a state file and manifests or against
//! the cluster of the kubeconfig.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ReplicationController};
use kube::api::{Api, ListParams};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ListFormat;
use coral::api::ImageSet;
use coral::index::{ClusterIndex, ClusterObjects, StateFile, Stranded, stranded_workload};
use coral::policy::{SETTINGS_FILE, Settings};
use coral::webhook::ObjectName;

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Audit against this cluster-state file (the format of `coral policy eval --state`)
    /// instead of the cluster of the kubeconfig; the workloads come from --filename.
    #[arg(long, value_name = "STATE.yaml", env = "CORAL_STATE")]
    state: Option<PathBuf>,
    /// With --state: workload manifests: files (YAML streams, JSON, `List`s), directories (their
    /// *.yaml, *.yml and *.json files), or - for stdin. Repeat or separate with commas.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR",
        env = "CORAL_FILENAME",
        value_delimiter = ','
    )]
    files: Vec<String>,
    /// Schedulable nodes a pod template needs. Default: minAvailableNodes of the state file's
    /// settings, or in a cluster of the policy ConfigMap's settings.json, else 1.
    #[arg(long, value_name = "N", env = "CORAL_MIN_AVAILABLE_NODES")]
    min_available_nodes: Option<u32>,
    #[command(flatten)]
    policies_configmap: super::PoliciesConfigMapArg,
    /// In a cluster: audit only this namespace. Default: every namespace.
    #[arg(short, long, env = "CORAL_NAMESPACE")]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "text", env = "CORAL_OUTPUT")]
    output: ListFormat,
}

/// Exit codes: 0 nothing stranded, 1 stranded workloads found, 2 the audit could not run.
pub fn run(args: AuditArgs) -> Result<ExitCode> {
    match audit(args) {
        Ok(code) => Ok(code),
        Err(error) => {
            eprintln!("error: {}", coral::report::error_message(&error));
            Ok(ExitCode::from(2))
        }
    }
}

fn audit(args: AuditArgs) -> Result<ExitCode> {
    let AuditArgs {
        state,
        files,
        min_available_nodes,
        policies_configmap,
        namespace,
        output,
    } = args;
    let (index, workloads, settings) = match state {
        Some(state) => {
            if files.is_empty() {
                bail!("--state needs the workloads to audit: -f FILE|DIR (or - for stdin)");
            }
            if namespace.is_some() {
                bail!(
                    "--namespace selects what to list from a cluster; with --state the manifests are the workloads"
                );
            }
            let state = StateFile::load(&state)?;
            let mut workloads = Vec::new();
            for file in &files {
                workloads.extend(read_manifests(file)?);
            }
            let settings = state.settings.clone().unwrap_or_default();
            (state.to_index(), workloads, settings)
        }
        None => {
            if !files.is_empty() {
                bail!(
                    "-f names manifests to audit against a state file: add --state STATE.yaml, or drop -f to audit the cluster"
                );
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(from_cluster(&policies_configmap.name, namespace.as_deref()))?
        }
    };
    let min = min_available_nodes.unwrap_or(settings.min_available_nodes);
    let placement = index.placement();
    let images = index.images_by_label();
    let found: Vec<Stranded> = workloads
        .iter()
        .filter_map(|object| stranded_workload(object, &placement, &images, min as usize))
        .collect();

    let mut out = std::io::stdout().lock();
    match output {
        ListFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&found)?)?,
        ListFormat::Text => {
            for stranded in &found {
                writeln!(
                    out,
                    "{} {}/{}: {}",
                    stranded.kind,
                    stranded.namespace,
                    stranded.name,
                    stranded.reason()
                )?;
            }
            if found.is_empty() {
                writeln!(
                    out,
                    "no stranded workloads ({} workload(s) checked against {} node(s))",
                    workloads.len(),
                    placement.node_count()
                )?;
            } else {
                writeln!(
                    out,
                    "{} stranded workload(s) of {} checked. To finish: let the agents pull the images again (keep them in an ImageSet), or remove the image.coral.dev/ entries from the templates; the webhook removes the entries of unmanaged images on their next update.",
                    found.len(),
                    workloads.len()
                )?;
            }
        }
    }
    Ok(if found.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The objects of a manifest file or directory: YAML streams, JSON, and `List`s unpacked.
fn read_manifests(file: &str) -> Result<Vec<Value>> {
    if file == "-" {
        return parse_manifests(&super::policy::read_input(file)?, "stdin");
    }
    let path = Path::new(file);
    if !path.is_dir() {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {file}"))?;
        return parse_manifests(&text, file);
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read the directory {file}"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read the directory {file}"))?;
    entries.sort();
    let mut objects = Vec::new();
    for entry in entries {
        let is_manifest = entry
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
        if is_manifest {
            objects.extend(read_manifests(&entry.display().to_string())?);
        }
    }
    Ok(objects)
}

fn parse_manifests(text: &str, origin: &str) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).with_context(|| {
            format!("{origin}: document {} is not valid YAML or JSON", index + 1)
        })?;
        match value {
            Value::Null => {}
            Value::Object(ref object)
                if object.get("kind").and_then(Value::as_str) == Some("List") =>
            {
                objects.extend(
                    object
                        .get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                );
            }
            other => objects.push(other),
        }
    }
    Ok(objects)
}

/// Nodes, ImageSets, workloads and settings of the cluster in the kubeconfig.
async fn from_cluster(
    configmap: &ObjectName,
    namespace: Option<&str>,
) -> Result<(ClusterIndex, Vec<Value>, Settings)> {
    let client = coral::cluster::client().await?;
    let nodes: Vec<Node> = list_all(Api::all(client.clone()), "nodes").await?;
    let image_sets: Vec<ImageSet> = list_all(Api::all(client.clone()), "imagesets").await?;
    let settings = match Api::<ConfigMap>::namespaced(client.clone(), &configmap.namespace)
        .get_opt(&configmap.name)
        .await
        .with_context(|| format!("cannot read the policy ConfigMap {configmap}"))?
    {
        Some(found) => match found.data.as_ref().and_then(|data| data.get(SETTINGS_FILE)) {
            Some(text) => {
                Settings::from_json(text).with_context(|| format!("ConfigMap {configmap}"))?
            }
            None => Settings::default(),
        },
        None => Settings::default(),
    };

    let mut workloads = Vec::new();
    macro_rules! workloads {
        ($($kind:ty => $resource:literal),*) => {$(
            let api: Api<$kind> = match namespace {
                Some(namespace) => Api::namespaced(client.clone(), namespace),
                None => Api::all(client.clone()),
            };
            for object in list_all(api, $resource).await? {
                workloads.push(serde_json::to_value(object)?);
            }
        )*};
    }
    workloads!(
        Deployment => "deployments",
        StatefulSet => "statefulsets",
        DaemonSet => "daemonsets",
        ReplicaSet => "replicasets",
        ReplicationController => "replicationcontrollers",
        Job => "jobs",
        CronJob => "cronjobs",
        Pod => "pods"
    );

    let image_sets: Vec<&ImageSet> = image_sets.iter().collect();
    let nodes: Vec<&Node> = nodes.iter().collect();
    let index = ClusterIndex::from_objects(ClusterObjects {
        image_sets: &image_sets,
        nodes: &nodes,
        namespaces: &[],
        node_images: &[],
    });
    Ok((index, workloads, settings))
}

/// Every object of a resource, 500 per page.
pub(super) async fn list_all<K>(api: Api<K>, resource: &str) -> Result<Vec<K>>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut objects = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api
            .list(&params)
            .await
            .with_context(|| format!("cannot list {resource}"))?;
        objects.extend(page.items);
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(objects),
        }
    }
}
