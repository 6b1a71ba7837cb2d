//! The mirror worker: while this replica leads, copies the images of every ImageSet with
//! `spec.mirror` into its `Registry` (the plan and state in [`crate::mirror::book`], the
//! copying in [`crate::mirror::Copier`]), probes every Registry, and writes Registry status.
//! The ImageSet status it feeds is written by the controller's reconcile, the one writer of
//! ImageSet status ([`with_mirror`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use super::aggregate::{condition, previous_conditions};
use super::secrets::copy_name;
use crate::api::{
    ImageMirrorStatus, ImageSet, ImageSetStatus, MirrorState, Registry, RegistryStatus,
    RetiringCopy,
};
use crate::credentials::Keyring;
use crate::metrics::ControllerMetrics;
use crate::mirror::book::{self, Attempt, Book, Destination, Wanted};
use crate::mirror::{Copier, DEFAULT_BLOB_CONCURRENCY, MirrorTarget};

/// The condition an ImageSet that mirrors carries.
pub const MIRRORED_CONDITION: &str = "Mirrored";
/// The condition of a Registry.
pub const REACHABLE_CONDITION: &str = "Reachable";

/// Puts each image's mirror status and the `Mirrored` condition into a computed status, for
/// an ImageSet that mirrors (`copies`: what the worker knows, by normalized reference).
pub fn with_mirror(
    mut status: ImageSetStatus,
    set: &ImageSet,
    copies: &BTreeMap<String, ImageMirrorStatus>,
    previous: Option<&ImageSetStatus>,
    now: &Time,
) -> ImageSetStatus {
    status.conditions.retain(|c| c.type_ != MIRRORED_CONDITION);
    let Some(mirror) = &set.spec.mirror else {
        for image in &mut status.images {
            image.mirror = None;
        }
        return status;
    };
    for image in &mut status.images {
        image.mirror = copies.get(&image.normalized).cloned();
    }
    let total = status.images.len();
    let mirrored = status
        .images
        .iter()
        .filter(|i| {
            i.mirror
                .as_ref()
                .is_some_and(|m| m.state == MirrorState::Mirrored)
        })
        .count();
    let failed: Vec<(&str, &str)> = status
        .images
        .iter()
        .filter_map(|i| {
            let m = i.mirror.as_ref()?;
            (m.state == MirrorState::Failed).then(|| {
                (
                    i.image.as_str(),
                    m.last_error.as_deref().unwrap_or("failed"),
                )
            })
        })
        .collect();
    let registry = &mirror.registry;
    let (state, reason, message) = if mirrored == total {
        (
            "True",
            "AllMirrored",
            format!("all {total} image(s) are in registry {registry}"),
        )
    } else if let Some((image, error)) = failed.first() {
        let more = if failed.len() > 1 {
            format!(" ({} image(s) failed in all)", failed.len())
        } else {
            String::new()
        };
        (
            "False",
            "MirrorFailed",
            format!("{image} is not in registry {registry}: {error}{more}"),
        )
    } else {
        (
            "False",
            "Copying",
            format!("{mirrored} of {total} image(s) are in registry {registry}"),
        )
    };
    let generation = status.observed_generation;
    status.conditions.push(condition(
        MIRRORED_CONDITION,
        state,
        reason,
        message,
        generation,
        previous_conditions(previous),
        now,
    ));
    status
}

/// What `coral controller` tells the mirror worker.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Images copied at once (each with [`DEFAULT_BLOB_CONCURRENCY`] blobs at once).
    pub concurrency: usize,
    /// How often a mirrored image's source is compared with the mirror (a moved tag is copied
    /// again).
    pub recheck: Duration,
    /// How often every Registry is probed.
    pub probe_every: Duration,
    /// How long a copy no ImageSet mirrors any more stays in its Registry; `None`: for ever.
    pub retention: Option<Duration>,
}

/// The last probe of one Registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub generation: Option<i64>,
    pub error: Option<String>,
}

/// The mirror worker, shared by its tasks and the reconcile that reads its book.
pub struct Mirroring {
    pub book: Mutex<Book>,
    /// Registries with a `coral_registry_reachable` series, so that a deleted one's goes.
    probed: Mutex<std::collections::BTreeSet<String>>,
    client: Client,
    namespace: String,
    metrics: ControllerMetrics,
    options: MirrorOptions,
    permits: Arc<Semaphore>,
}

/// Credentials, trust and destination for one Registry.
struct Access {
    destination: Destination,
    keyring: Keyring,
    roots: Vec<u8>,
}

impl Mirroring {
    pub fn new(
        client: Client,
        namespace: String,
        metrics: ControllerMetrics,
        options: MirrorOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            book: Mutex::new(Book::new(options.recheck)),
            probed: Mutex::new(std::collections::BTreeSet::new()),
            client,
            namespace,
            metrics,
            permits: Arc::new(Semaphore::new(options.concurrency.max(1))),
            options,
        })
    }

    /// Retires the mirrored copies of an ImageSet being deleted, from what its status says
    /// (seeded first, should the worker not have read it yet).
    pub fn retire_deleted(&self, set: &ImageSet) {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        book.seed(set, Instant::now());
        book.retire_set(
            &set.namespace().unwrap_or_default(),
            &set.name_any(),
            &Time(Timestamp::now()),
        );
    }

    /// The copies of one ImageSet, for its status.
    pub fn copies(&self, namespace: &str, name: &str) -> BTreeMap<String, ImageMirrorStatus> {
        self.book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .of_set(namespace, name)
    }

    /// Runs until the process ends: while this replica leads, starts due copies and probes
    /// Registries; `wake` says the ImageSets or Registries changed, `changed` tells the
    /// reconcile that a copy finished.
    pub async fn run(
        self: Arc<Self>,
        image_sets: Store<ImageSet>,
        registries: Store<Registry>,
        leading: Arc<AtomicBool>,
        wake: Arc<Notify>,
        changed: Arc<Notify>,
    ) {
        let mut seeded = false;
        let mut probed: Option<Instant> = None;
        loop {
            if !leading.load(Ordering::SeqCst) {
                seeded = false;
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let now = Instant::now();
            let sets = image_sets.state();
            if !seeded {
                let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
                for set in &sets {
                    book.seed(set, now);
                }
                for registry in registries.state() {
                    if let Some(status) = &registry.status {
                        book.seed_retired(&registry.name_any(), &status.retiring);
                    }
                }
                seeded = true;
            }
            if probed.is_none_or(|at| now.duration_since(at) >= self.options.probe_every) {
                probed = Some(now);
                self.delete_retired(&registries, &leading).await;
                self.probe_all(&registries, &leading).await;
            }
            let wanted: Vec<Wanted> = sets
                .iter()
                .flat_map(|set| {
                    book::wanted(set).unwrap_or_else(|error| {
                        // The CRD's validation refuses such platforms; an older object may
                        // still carry one.
                        warn!(imageset = %set.name_any(), %error, "not mirrored");
                        Vec::new()
                    })
                })
                .collect();
            let targets: BTreeMap<String, Option<MirrorTarget>> = registries
                .state()
                .iter()
                .map(|r| (r.name_any(), book::destination(r).ok().map(|d| d.target)))
                .collect();
            let due = {
                let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
                book.retire(&wanted, &Time(Timestamp::now()));
                book.keep_retired_of(&targets.keys().cloned().collect());
                let due = book.due(&wanted, &targets, Instant::now());
                self.observe_states(&book);
                due
            };
            if !due.is_empty() {
                changed.notify_one();
            }
            for want in due {
                let worker = self.clone();
                let registries = registries.clone();
                let changed = changed.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = worker.permits.clone().acquire_owned().await else {
                        return;
                    };
                    let attempt = worker.attempt(&want, &registries).await;
                    worker.record(&want, &attempt);
                    changed.notify_one();
                });
            }
            let next = self
                .book
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next_due();
            let wait = next
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(self.options.probe_every)
                .clamp(Duration::from_millis(200), self.options.probe_every);
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn record(&self, want: &Wanted, attempt: &Attempt) {
        let registry = want.registry.as_str();
        match attempt {
            Attempt::Copied(copied) => {
                let metrics = &self.metrics;
                metrics
                    .mirror_bytes
                    .with_label_values(&[registry])
                    .inc_by(copied.bytes_copied);
                for (result, count) in [
                    ("copied", copied.blobs_copied),
                    ("skipped", copied.blobs_skipped),
                ] {
                    metrics
                        .mirror_blobs
                        .with_label_values(&[registry, result])
                        .inc_by(count as u64);
                }
                metrics
                    .mirror_seconds
                    .with_label_values(&[registry])
                    .observe(copied.took.as_secs_f64());
                if !copied.already {
                    info!(
                        image = %want.source,
                        mirror = %copied.mirror,
                        digest = %copied.mirror_digest,
                        bytes = copied.bytes_copied,
                        blobs_copied = copied.blobs_copied,
                        blobs_skipped = copied.blobs_skipped,
                        "mirrored"
                    );
                }
            }
            Attempt::Unusable(error) => {
                warn!(image = %want.source, registry, %error, "cannot mirror");
                self.metrics
                    .mirror_failures
                    .with_label_values(&[registry, "registry"])
                    .inc();
            }
            Attempt::Failed(error) => {
                warn!(image = %want.source, registry, %error, "mirroring failed; retried with backoff");
                self.metrics
                    .mirror_failures
                    .with_label_values(&[registry, book::failure_reason(error)])
                    .inc();
            }
        }
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        book.finish(
            &want.key,
            attempt,
            Instant::now(),
            &Time(Timestamp::now()),
            fastrand::f64(),
        );
        self.observe_states(&book);
    }

    fn observe_states(&self, book: &Book) {
        for (state, count) in book.by_state() {
            self.metrics
                .mirror_images
                .with_label_values(&[state])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    async fn attempt(&self, want: &Wanted, registries: &Store<Registry>) -> Attempt {
        let Some(registry) = registries.get(&ObjectRef::new(&want.registry)) else {
            return Attempt::Unusable(format!("Registry {} not found", want.registry));
        };
        let mut access = match self.access(&registry).await {
            Ok(access) => access,
            Err(error) => return Attempt::Unusable(error),
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        for (namespace, name) in &want.pull_secrets {
            // The controller's copy; a missing one is reported by the ImageSet's Degraded
            // condition, and a public image needs none.
            match secrets.get_opt(&copy_name(namespace, name)).await {
                Ok(Some(secret)) => {
                    if let Err(error) = access.keyring.add_secret(&secret) {
                        return Attempt::Unusable(format!(
                            "pull secret {namespace}/{name}: {error}"
                        ));
                    }
                }
                Ok(None) => {}
                Err(error) => {
                    return Attempt::Unusable(format!(
                        "cannot read pull secret {namespace}/{name}: {error}"
                    ));
                }
            }
        }
        let named = access.destination.target.clone();
        let copier = match self.copier(access, Some(&want.source)) {
            Ok(copier) => copier,
            Err(error) => return Attempt::Unusable(error),
        };
        if !want.pull_secrets.is_empty() && !registry.spec.private_images {
            return Attempt::Unusable(format!(
                "{} is private (pulled with the ImageSet's pull secrets) and Registry {} does not take private images (spec.privateImages)",
                want.source, want.registry
            ));
        }
        if !want.pull_secrets.is_empty() {
            // A private image (pulled with pull secrets) must not become readable by every
            // pod that can reach the mirror.
            match copier.0.serves_anonymously(&copier.1).await {
                Ok(false) => {}
                Ok(true) => {
                    return Attempt::Unusable(format!(
                        "Registry {} serves pulls without credentials, and {} is private (pulled with the ImageSet's pull secrets): give the registry authentication (the Registry's credentialsSecret) to mirror it",
                        want.registry, want.source
                    ));
                }
                Err(error) => return Attempt::Unusable(error),
            }
        }
        match copier
            .0
            .copy(&want.source, &copier.1, &want.platforms)
            .await
        {
            Ok(mut copied) => {
                // Copied through the push endpoint; pods pull by the endpoint.
                match crate::mirror::mirror_reference(&want.source, &named) {
                    Ok(reference) => {
                        copied.mirror = reference;
                        Attempt::Copied(Box::new(copied))
                    }
                    Err(error) => Attempt::Failed(error.into()),
                }
            }
            Err(error) => Attempt::Failed(error),
        }
    }

    /// A copier for `access`, and from `source` (a loopback source is plain HTTP), and the
    /// target it copies to (the push endpoint).
    fn copier(
        &self,
        access: Access,
        source: Option<&crate::image::ImageReference>,
    ) -> Result<(Copier, MirrorTarget), String> {
        let target = access.destination.push.clone();
        let mut plain: Vec<String> = source
            .map(|s| s.registry().to_string())
            .filter(|r| crate::mirror::is_loopback(r))
            .into_iter()
            .collect();
        if access.destination.plain_http {
            plain.push(target.endpoint().to_string());
        }
        plain.sort();
        plain.dedup();
        let copier = Copier::with_roots(
            access.keyring,
            plain,
            &access.roots,
            DEFAULT_BLOB_CONCURRENCY,
        )
        .map_err(|e| format!("{e:#}"))?;
        Ok((copier, target))
    }

    /// The destination, credentials and CA bundle of a Registry, from its spec and Secrets.
    async fn access(&self, registry: &Registry) -> Result<Access, String> {
        let destination = book::destination(registry)?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut keyring = Keyring::new();
        if let Some(name) = &registry.spec.credentials_secret {
            let secret = secrets
                .get_opt(name)
                .await
                .map_err(|e| {
                    format!(
                        "cannot read credentials secret {}/{name}: {e}",
                        self.namespace
                    )
                })?
                .ok_or_else(|| format!("credentials secret {}/{name} not found", self.namespace))?;
            keyring
                .add_secret(&secret)
                .map_err(|e| format!("credentials secret {}/{name}: {e}", self.namespace))?;
        }
        let mut roots = Vec::new();
        if let Some(ca) = &registry.spec.tls.ca_secret {
            let key = ca.key.as_deref().unwrap_or("ca.crt");
            let secret = secrets
                .get_opt(&ca.name)
                .await
                .map_err(|e| format!("cannot read CA secret {}/{}: {e}", self.namespace, ca.name))?
                .ok_or_else(|| format!("CA secret {}/{} not found", self.namespace, ca.name))?;
            roots = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| b.0.clone())
                .ok_or_else(|| {
                    format!("CA secret {}/{} has no key {key}", self.namespace, ca.name)
                })?;
        }
        Ok(Access {
            destination,
            keyring,
            roots,
        })
    }

    /// Deletes from their Registries the retired copies past the retention period that no Pod
    /// runs (a Pod that does keeps its copy, and the Registry's status says so).
    async fn delete_retired(&self, registries: &Store<Registry>, leading: &AtomicBool) {
        let Some(retention) = self.options.retention else {
            return;
        };
        let due = self
            .book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retired_due(retention, std::time::SystemTime::now());
        if due.is_empty() {
            return;
        }
        let running = match self.pod_images().await {
            Ok(running) => running,
            Err(error) => {
                warn!(%error, "cannot list the Pods; no retired copy is deleted until they can be listed");
                return;
            }
        };
        let mut copiers: BTreeMap<String, Result<(Copier, String, String), String>> =
            BTreeMap::new();
        for (name, copy) in due {
            if !leading.load(Ordering::SeqCst) {
                return;
            }
            if let Some((pod, _)) = running.iter().find(|(_, image)| runs_copy(image, &copy)) {
                self.book
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_retired_kept(&name, &copy.reference, Some(format!("Pod {pod} runs it")));
                continue;
            }
            let Some(registry) = registries.get(&ObjectRef::new(&name)) else {
                continue;
            };
            // One copier per Registry and pass: its Secrets are read once.
            if !copiers.contains_key(&name) {
                let copier = match self.access(&registry).await {
                    Ok(access) => {
                        let named = access.destination.target.to_string();
                        self.copier(access, None)
                            .map(|(copier, push)| (copier, named, push.to_string()))
                    }
                    Err(error) => Err(error),
                };
                copiers.insert(name.clone(), copier);
            }
            let result = match &copiers[&name] {
                Ok((copier, named, push)) => {
                    // Named by the endpoint, deleted through the push endpoint.
                    let pushed = copy
                        .reference
                        .strip_prefix(named.as_str())
                        .map(|rest| format!("{push}{rest}"))
                        .unwrap_or_else(|| copy.reference.clone());
                    match crate::image::ImageReference::parse(&pushed) {
                        Ok(reference) => copier.delete(&reference, &copy.digest).await,
                        Err(error) => Err(format!("{pushed}: {error}")),
                    }
                }
                Err(error) => Err(error.clone()),
            };
            let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
            match result {
                Ok(found) => {
                    book.forget_retired(&name, &copy.reference);
                    self.metrics
                        .mirror_deleted
                        .with_label_values(&[&name])
                        .inc();
                    info!(registry = %name, reference = %copy.reference, digest = %copy.digest, found, "deleted a copy no ImageSet mirrors");
                }
                Err(error) => {
                    warn!(registry = %name, reference = %copy.reference, %error, "cannot delete a retired copy; trying again later");
                    self.metrics
                        .mirror_failures
                        .with_label_values(&[&name, "delete"])
                        .inc();
                    book.set_retired_kept(&name, &copy.reference, Some(error));
                }
            }
        }
    }

    /// `(namespace/name, image)` of every container of every Pod not yet finished.
    async fn pod_images(&self) -> Result<Vec<(String, String)>, kube::Error> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(self.client.clone());
        let mut params = kube::api::ListParams::default()
            .fields("status.phase!=Succeeded,status.phase!=Failed")
            .limit(500);
        let mut images = Vec::new();
        loop {
            let page = pods.list(&params).await?;
            for pod in &page.items {
                let name = format!(
                    "{}/{}",
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                    pod.metadata.name.as_deref().unwrap_or_default()
                );
                let Some(spec) = &pod.spec else {
                    continue;
                };
                let containers = spec
                    .containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
                    .filter_map(|c| c.image.clone());
                let ephemeral = spec
                    .ephemeral_containers
                    .iter()
                    .flatten()
                    .filter_map(|c| c.image.clone());
                images.extend(
                    containers
                        .chain(ephemeral)
                        .map(|image| (name.clone(), image)),
                );
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(images),
            }
        }
    }

    /// Probes every Registry and writes the status of those whose picture changed.
    async fn probe_all(&self, registries: &Store<Registry>, leading: &AtomicBool) {
        for registry in registries.state() {
            if !leading.load(Ordering::SeqCst) {
                return;
            }
            let name = registry.name_any();
            let result = match self.access(&registry).await {
                Ok(access) => match self.copier(access, None) {
                    Ok((copier, target)) => copier.probe(&target).await,
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            self.metrics
                .registry_reachable
                .with_label_values(&[&name])
                .set(i64::from(result.is_ok()));
            let health = Health {
                generation: registry.metadata.generation,
                error: result.err(),
            };
            if let Some(error) = &health.error {
                warn!(registry = %name, %error, "registry probe failed");
            }
            self.probed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.clone());
            let held = {
                let book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
                Held {
                    images: book.mirrored_in(&name),
                    bytes: book.mirrored_bytes_in(&name),
                    retiring: book.retiring_in(&name),
                }
            };
            let status = registry_status(
                &health,
                held,
                registry.status.as_ref(),
                &Time(Timestamp::now()),
            );
            if registry.status.as_ref() != Some(&status) {
                let api: Api<Registry> = Api::all(self.client.clone());
                if let Err(error) = api
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(registry_status_patch(&status)),
                    )
                    .await
                {
                    warn!(registry = %name, %error, "cannot write the Registry's status");
                }
            }
        }
        let names: Vec<String> = registries.state().iter().map(|r| r.name_any()).collect();
        self.probed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|name| {
                let present = names.contains(name);
                if !present {
                    // A deleted Registry is neither reachable nor unreachable: no series.
                    let _ = self.metrics.registry_reachable.remove_label_values(&[name]);
                }
                present
            });
    }
}

/// What the worker knows a Registry holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Distinct mirror references it holds.
    pub images: usize,
    /// Their size, when every one is known.
    pub bytes: Option<u64>,
    pub retiring: Vec<RetiringCopy>,
}

/// The merge patch that makes a Registry's status `status`, clearing what it leaves out.
fn registry_status_patch(status: &RegistryStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        for field in ["lastError", "mirroredBytes", "retiring"] {
            fields.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    json!({ "status": value })
}

/// A Registry's status after a probe; the condition keeps its transition time while its
/// status stays.
pub fn registry_status(
    health: &Health,
    held: Held,
    previous: Option<&RegistryStatus>,
    now: &Time,
) -> RegistryStatus {
    let (state, reason, message) = match &health.error {
        None => ("True", "Answered", "GET /v2/ answered".to_string()),
        Some(error) => ("False", "ProbeFailed", error.clone()),
    };
    RegistryStatus {
        observed_generation: health.generation,
        conditions: vec![condition(
            REACHABLE_CONDITION,
            state,
            reason,
            message,
            health.generation,
            previous.map_or(&[], |p| p.conditions.as_slice()),
            now,
        )],
        last_error: health.error.clone(),
        mirrored_images: i32::try_from(held.images).unwrap_or(i32::MAX),
        mirrored_bytes: held.bytes.and_then(|b| i64::try_from(b).ok()),
        retiring: held.retiring,
    }
}

/// Whether a container image (as a Pod names it) runs the mirror reference `copy` (by its
/// tag, or by the digest it serves).
pub fn runs_copy(image: &str, copy: &RetiringCopy) -> bool {
    let (Ok(image), Ok(reference)) = (
        crate::image::ImageReference::parse(image),
        crate::image::ImageReference::parse(&copy.reference),
    ) else {
        return false;
    };
    image.name() == reference.name()
        && (image.digest() == Some(copy.digest.as_str())
            || (image.digest().is_none() && image.tag() == reference.tag()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ImageSetImageStatus, ImageSetMirror, ImageSetSpec};

    fn now() -> Time {
        Time(Timestamp::from_second(1_800_000_000).expect("time"))
    }

    fn computed() -> ImageSetStatus {
        let image = |raw: &str, normalized: &str| ImageSetImageStatus {
            image: raw.into(),
            normalized: normalized.into(),
            ..ImageSetImageStatus::default()
        };
        ImageSetStatus {
            observed_generation: Some(3),
            images: vec![
                image("nginx:1.27", "docker.io/library/nginx:1.27"),
                image("redis:7", "docker.io/library/redis:7"),
            ],
            ..ImageSetStatus::default()
        }
    }

    fn copy(state: MirrorState, error: Option<&str>) -> ImageMirrorStatus {
        ImageMirrorStatus {
            reference: "localhost:5000/x".into(),
            state,
            last_error: error.map(str::to_string),
            ..ImageMirrorStatus::default()
        }
    }

    fn mirrored_condition(status: &ImageSetStatus) -> (String, String, String) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == MIRRORED_CONDITION)
            .expect("Mirrored condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn the_mirrored_condition_names_what_is_missing() {
        let set = ImageSet::new(
            "cache",
            ImageSetSpec {
                images: vec!["nginx:1.27".into(), "redis:7".into()],
                mirror: Some(ImageSetMirror {
                    registry: "local".into(),
                    platforms: Vec::new(),
                }),
                ..ImageSetSpec::default()
            },
        );
        let empty = BTreeMap::new();
        let status = with_mirror(computed(), &set, &empty, None, &now());
        assert_eq!(
            mirrored_condition(&status),
            (
                "False".into(),
                "Copying".into(),
                "0 of 2 image(s) are in registry local".into()
            )
        );
        let mut copies = BTreeMap::from([
            (
                "docker.io/library/nginx:1.27".to_string(),
                copy(MirrorState::Mirrored, None),
            ),
            (
                "docker.io/library/redis:7".to_string(),
                copy(MirrorState::Failed, Some("unauthorized")),
            ),
        ]);
        let status = with_mirror(computed(), &set, &copies, None, &now());
        assert_eq!(
            mirrored_condition(&status),
            (
                "False".into(),
                "MirrorFailed".into(),
                "redis:7 is not in registry local: unauthorized".into()
            )
        );
        assert_eq!(
            status.images[0].mirror.as_ref().map(|m| m.state),
            Some(MirrorState::Mirrored)
        );
        copies.insert(
            "docker.io/library/redis:7".into(),
            copy(MirrorState::Mirrored, None),
        );
        let later = Time(Timestamp::from_second(1_800_000_100).expect("time"));
        let ready = with_mirror(computed(), &set, &copies, Some(&status), &later);
        assert_eq!(mirrored_condition(&ready).1, "AllMirrored");
        let again = with_mirror(
            computed(),
            &set,
            &copies,
            Some(&ready),
            &Time(Timestamp::from_second(1_800_000_200).expect("time")),
        );
        assert_eq!(
            again.conditions, ready.conditions,
            "an unchanged picture keeps its transition time"
        );

        let mut plain = set.clone();
        plain.spec.mirror = None;
        let status = with_mirror(ready.clone(), &plain, &copies, Some(&ready), &now());
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.type_ != MIRRORED_CONDITION)
        );
        assert!(
            status.images.iter().all(|i| i.mirror.is_none()),
            "a set that stops mirroring shows no copies"
        );
    }

    #[test]
    fn a_registry_status_says_why_it_is_unreachable() {
        let up = registry_status(
            &Health {
                generation: Some(1),
                error: None,
            },
            Held {
                images: 2,
                bytes: Some(300),
                retiring: Vec::new(),
            },
            None,
            &now(),
        );
        assert_eq!(
            (
                up.conditions[0].status.as_str(),
                up.mirrored_images,
                up.mirrored_bytes
            ),
            ("True", 2, Some(300))
        );
        let down = registry_status(
            &Health {
                generation: Some(1),
                error: Some("GET http://localhost:5000/v2/: connection refused".into()),
            },
            Held::default(),
            Some(&up),
            &now(),
        );
        assert_eq!(down.conditions[0].status, "False");
        assert_eq!(down.conditions[0].reason, "ProbeFailed");
        assert_eq!(
            down.last_error.as_deref(),
            Some("GET http://localhost:5000/v2/: connection refused")
        );
        // What it leaves out, the merge patch clears.
        let patch = registry_status_patch(&down);
        assert!(patch["status"]["mirroredBytes"].is_null());
        assert!(patch["status"]["retiring"].is_null());
    }

    #[test]
    fn a_pod_runs_a_copy_by_its_tag_or_the_digest_it_serves() {
        let copy = RetiringCopy {
            reference: "localhost:5000/docker.io/library/nginx:1.27".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            since: now(),
            kept: None,
        };
        let digest = &copy.digest;
        assert!(runs_copy(
            "localhost:5000/docker.io/library/nginx:1.27",
            &copy
        ));
        assert!(runs_copy(
            &format!("localhost:5000/docker.io/library/nginx:1.27@{digest}"),
            &copy
        ));
        assert!(runs_copy(
            &format!("localhost:5000/docker.io/library/nginx@{digest}"),
            &copy
        ));
        assert!(!runs_copy(
            "localhost:5000/docker.io/library/nginx:1.28",
            &copy
        ));
        assert!(
            !runs_copy("nginx:1.27", &copy),
            "the source is not the copy"
        );
        assert!(!runs_copy(
            &format!(
                "localhost:5000/docker.io/library/nginx:1.27@sha256:{}",
                "b".repeat(64)
            ),
            &copy
        ));
        assert!(!runs_copy("not a reference", &copy));
    }
}
