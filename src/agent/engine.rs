//! The pull engine: keeps the wanted images on the runtime with bounded concurrency, one pull
//! per image at a time, backoff per image, and pauses under pressure. Shared by `coral agent`
//! and `coral prefetch`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, Semaphore, watch};
use tracing::{info, warn};

use super::cri::{Cri, CriError, RuntimeImage, RuntimeVersion};
use super::pin::{PinError, Pinner};
use super::retention::{RemovalReason, RetentionPolicy};
use super::tracker::{ImageRecord, Inventory, RetryPolicy, Tracker, held};
use crate::api::ImageState;
use crate::credentials::{Credential, Keyring};
use crate::image::ImageReference;
use crate::metrics::AgentMetrics;

/// How the engine pulls.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub max_concurrent_pulls: usize,
    pub retry: RetryPolicy,
    /// How often the runtime's images are listed when nothing else happens, to notice images
    /// removed behind the engine's back.
    pub resync: Duration,
    /// No new pulls while the image filesystems use more than this many bytes.
    pub image_fs_budget: Option<u64>,
    /// Pin wanted images on containerd, out of the kubelet's image garbage collection.
    pub pin_images: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_concurrent_pulls: 2,
            retry: RetryPolicy::default(),
            resync: Duration::from_secs(60),
            image_fs_budget: None,
            pin_images: false,
        }
    }
}

/// Delay between attempts to reach a runtime that does not answer.
const RUNTIME_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const RUNTIME_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The engine. Share it in an `Arc`; [`Engine::run`] drives it.
pub struct Engine {
    cri: Cri,
    options: EngineOptions,
    tracker: Mutex<Tracker>,
    /// Why the node asks for no new pulls (DiskPressure, PIDPressure), from the node's status.
    node_pressure: Mutex<Option<String>>,
    fs_over_budget: AtomicBool,
    /// The runtime answered the last call.
    runtime_up: AtomicBool,
    wake: Notify,
    changes: watch::Sender<u64>,
    pulls: Semaphore,
    metrics: AgentMetrics,
    /// Wanted images with a ready copy in a mirror: pulled from there first.
    mirrors: Mutex<HashMap<ImageReference, ImageReference>>,
    /// How often wanted tags are resolved again (`spec.refresh`).
    refresh: Mutex<HashMap<ImageReference, Duration>>,
    /// Pins wanted images on containerd; `None` when not asked, or the runtime cannot.
    pinner: Mutex<Option<Pinner>>,
    /// Images pinned, and unwanted images unpinned, by this engine (by name).
    pins: Mutex<Pins>,
}

/// What the engine pinned and released.
#[derive(Debug, Default)]
struct Pins {
    pinned: std::collections::HashSet<String>,
    released: std::collections::HashSet<String>,
}

/// A removal of an unwanted image that did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// A container uses the image.
    InUse(String),
    /// A wanted image has the same content.
    SharedWithWanted(String),
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InUse(id) => write!(f, "a container uses it ({id})"),
            Self::SharedWithWanted(id) => write!(f, "a wanted image has the same content ({id})"),
        }
    }
}

impl Engine {
    pub fn new(cri: Cri, options: EngineOptions, metrics: AgentMetrics) -> Arc<Self> {
        let (changes, _) = watch::channel(0);
        let pinner = options.pin_images.then(|| Pinner::new(cri.channel()));
        Arc::new(Self {
            tracker: Mutex::new(Tracker::new(options.retry)),
            pulls: Semaphore::new(options.max_concurrent_pulls.max(1)),
            cri,
            options,
            node_pressure: Mutex::new(None),
            fs_over_budget: AtomicBool::new(false),
            runtime_up: AtomicBool::new(false),
            wake: Notify::new(),
            changes,
            metrics,
            mirrors: Mutex::new(HashMap::new()),
            refresh: Mutex::new(HashMap::new()),
            pinner: Mutex::new(pinner),
            pins: Mutex::new(Pins::default()),
        })
    }

    /// Replaces how often each wanted tag is resolved again.
    pub fn set_refresh(&self, periods: HashMap<ImageReference, Duration>) {
        *self.refresh.lock().unwrap_or_else(PoisonError::into_inner) = periods;
        self.wake.notify_one();
    }

    /// Replaces the mirror copies to pull before their source: the mirror reference of each
    /// source image. The copy comes from inside the cluster and lands under the name pods
    /// rewritten to the mirror run; the source pull that follows then finds every blob there
    /// and fetches its manifest only.
    pub fn set_mirrors(&self, mirrors: HashMap<ImageReference, ImageReference>) {
        *self.mirrors.lock().unwrap_or_else(PoisonError::into_inner) = mirrors;
    }

    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        // A panic while holding the lock leaves consistent records: every update is one step.
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the records, for reporting.
    pub fn snapshot(&self) -> Tracker {
        self.tracker().clone()
    }

    /// Ticks on every change of the records.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|version| *version += 1);
        let counts = self.tracker().counts();
        for (state, count) in [
            ("wanted", counts.wanted),
            ("available", counts.available),
            ("pulling", counts.pulling),
            ("failed", counts.failed),
            ("paused", counts.paused),
        ] {
            self.metrics
                .images
                .with_label_values(&[state])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Records a listing of the runtime without asking it: what the tests of exact API
    /// requests give an engine whose runtime they do not run.
    #[cfg(test)]
    pub(crate) fn runtime_listed(&self, images: Vec<super::cri::RuntimeImage>) {
        let inventory = Inventory::new(images);
        self.tracker().observe(&inventory, Instant::now(), false);
        self.changed();
    }

    /// Replaces the wanted images; returns the records of images no longer wanted.
    pub fn set_wanted(
        &self,
        wanted: impl IntoIterator<Item = (ImageReference, Arc<Keyring>)>,
    ) -> Vec<ImageRecord> {
        let removed = self.tracker().set_wanted(wanted);
        self.changed();
        self.wake.notify_one();
        removed
    }

    /// Sets or clears the node condition that holds back new pulls.
    pub fn set_node_pressure(&self, pressure: Option<String>) {
        let mut current = self
            .node_pressure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *current != pressure {
            match &pressure {
                Some(reason) => warn!(%reason, "pulls paused"),
                None => info!("node pressure gone; pulls resume"),
            }
            *current = pressure;
            drop(current);
            self.wake.notify_one();
        }
    }

    /// Why new pulls are held back, if they are.
    pub fn paused_reason(&self) -> Option<String> {
        if let Some(reason) = self
            .node_pressure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Some(reason);
        }
        self.fs_over_budget
            .load(Ordering::SeqCst)
            .then(|| "the image filesystem is over its budget".to_string())
    }

    /// Whether the runtime answered the last call.
    pub fn runtime_up(&self) -> bool {
        self.runtime_up.load(Ordering::SeqCst)
    }

    fn cri_error(&self, error: &CriError) {
        self.metrics
            .cri_errors
            .with_label_values(&[error.operation, error.metric_label()])
            .inc();
        if error.is_unavailable() && self.runtime_up.swap(false, Ordering::SeqCst) {
            warn!(socket = %self.cri.socket().display(), %error, "container runtime unreachable; retrying with backoff");
        }
    }

    /// Asks the runtime its version until it answers.
    pub async fn connect(&self) -> RuntimeVersion {
        let mut delay = RUNTIME_BACKOFF_INITIAL;
        loop {
            match self.cri.version().await {
                Ok(version) => {
                    self.runtime_up.store(true, Ordering::SeqCst);
                    return version;
                }
                Err(error) => {
                    self.cri_error(&error);
                    warn!(socket = %self.cri.socket().display(), %error, retry_in = ?delay, "container runtime not answering");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RUNTIME_BACKOFF_MAX);
                }
            }
        }
    }

    /// Runs forever: lists what the runtime holds, starts the pulls that are due, and sleeps
    /// until a pull ends, the wanted set or the pressure changes, a backoff ends, or the
    /// resync period passes.
    pub async fn run(self: Arc<Self>) {
        let mut runtime_delay = RUNTIME_BACKOFF_INITIAL;
        loop {
            // Pulls and refreshes go on while the runtime lists its images: what ends
            // meanwhile is judged by the next listing.
            let listing = self.tracker().listing();
            let images = match self.cri.list_images().await {
                Ok(images) => {
                    if !self.runtime_up.swap(true, Ordering::SeqCst) {
                        info!(socket = %self.cri.socket().display(), "container runtime reachable");
                    }
                    runtime_delay = RUNTIME_BACKOFF_INITIAL;
                    images
                }
                Err(error) => {
                    self.cri_error(&error);
                    tokio::select! {
                        () = tokio::time::sleep(runtime_delay) => {}
                        () = self.wake.notified() => {}
                    }
                    runtime_delay = (runtime_delay * 2).min(RUNTIME_BACKOFF_MAX);
                    continue;
                }
            };
            self.check_budget().await;
            let paused = self.paused_reason().is_some();
            self.metrics.paused.set(i64::from(paused));
            let inventory = Inventory::new(images);
            let now = Instant::now();
            let periods = self
                .refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let (due, refresh, observed, next) = {
                let mut tracker = self.tracker();
                let observed = tracker.observe_listing(&inventory, listing, now, paused);
                let due = if paused { Vec::new() } else { tracker.due(now) };
                let due: Vec<_> = due.into_iter().filter(|i| tracker.start(i)).collect();
                let refresh = if paused {
                    Vec::new()
                } else {
                    tracker.refresh_due(now, &periods)
                };
                let refresh: Vec<_> = refresh.into_iter().filter(|i| tracker.start(i)).collect();
                let next = [tracker.next_due(), tracker.next_refresh(&periods)]
                    .into_iter()
                    .flatten()
                    .min();
                (due, refresh, observed, next)
            };
            if observed.vanished > 0 {
                self.metrics.vanished.inc_by(observed.vanished as u64);
                warn!(
                    count = observed.vanished,
                    "images disappeared from the runtime; pulling them again after a backoff"
                );
            }
            if observed.changed || !due.is_empty() {
                self.changed();
            }
            self.sync_pins().await;
            for image in due {
                tokio::spawn(self.clone().pull(image));
            }
            for image in refresh {
                tokio::spawn(self.clone().refresh(image));
            }
            let resync = tokio::time::Instant::now() + self.options.resync;
            let wake_at = next
                .map(tokio::time::Instant::from_std)
                .map_or(resync, |t| t.min(resync));
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn check_budget(&self) {
        let Some(budget) = self.options.image_fs_budget else {
            return;
        };
        match self.cri.image_fs_used_bytes().await {
            Ok(used) => {
                let over = used > budget;
                if self.fs_over_budget.swap(over, Ordering::SeqCst) != over {
                    if over {
                        warn!(
                            used,
                            budget, "image filesystem over its budget; pulls paused"
                        );
                    } else {
                        info!(used, budget, "image filesystem back under its budget");
                    }
                }
            }
            Err(error) => self.cri_error(&error),
        }
    }

    /// The credentials to pull a wanted image with.
    fn keyring_of(&self, image: &ImageReference) -> Arc<Keyring> {
        self.tracker()
            .get(image)
            .map(|record| record.keyring.clone())
            .unwrap_or_default()
    }

    /// What the runtime holds of an image now, when it says.
    async fn held_now(&self, image: &ImageReference) -> Option<super::tracker::Held> {
        match self.cri.image_status(&image.to_string()).await {
            Ok(found) => found.map(|found| held(&found, image)),
            Err(error) => {
                self.cri_error(&error);
                None
            }
        }
    }

    async fn pull(self: Arc<Self>, image: ImageReference) {
        let Ok(_permit) = self.pulls.acquire().await else {
            return;
        };
        let keyring = self.keyring_of(&image);
        let started = Instant::now();
        let via = self
            .mirrors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&image)
            .cloned();
        if let Some(via) = via {
            // The node's runtime holds whatever credentials the mirror wants, as for pods.
            match self.cri.pull(&via.to_string(), None).await {
                Ok(_) => {
                    self.metrics
                        .mirror_pulls
                        .with_label_values(&["success"])
                        .inc();
                    info!(%image, mirror = %via, "pulled the mirror's copy");
                }
                Err(error) => {
                    self.metrics
                        .mirror_pulls
                        .with_label_values(&["failure"])
                        .inc();
                    warn!(%image, mirror = %via, %error, "cannot pull the mirror's copy; pulling from the source");
                }
            }
        }
        let result = pull_with(&self.cri, &image, &keyring.lookup(&image)).await;
        match result {
            Ok(()) => {
                let held = self.held_now(&image).await;
                let seconds = started.elapsed().as_secs_f64();
                self.metrics.pulls.with_label_values(&["success"]).inc();
                self.metrics.pull_seconds.observe(seconds);
                self.metrics
                    .pulled_bytes
                    .inc_by(held.as_ref().map_or(0, |h| h.size));
                info!(%image, seconds, "image pulled");
                self.tracker().succeeded(&image, held);
            }
            Err(error) if error.cri.is_unavailable() => {
                // The runtime went away (restarting): not the image's fault, so no attempt is
                // counted; the engine's loop waits for the runtime before pulling again.
                self.cri_error(&error.cri);
                self.tracker()
                    .retry_later(&image, Instant::now() + RUNTIME_BACKOFF_INITIAL);
            }
            Err(error) => {
                self.metrics.pulls.with_label_values(&["failure"]).inc();
                self.cri_error(&error.cri);
                let message = error.to_string();
                let mut tracker = self.tracker();
                tracker.failed(&image, message.clone(), Instant::now(), fastrand::f64());
                let attempts = tracker.get(&image).map_or(0, |r| r.attempts);
                drop(tracker);
                warn!(%image, attempts, error = %message, "pull failed");
            }
        }
        self.changed();
        self.wake.notify_one();
    }

    /// Removes the unwanted images that `policy` says go now (past their grace period, or
    /// the least recently wanted while the image filesystem is over its high watermark),
    /// unless a container uses them or a wanted image has the same content. Returns what was
    /// kept and why.
    pub async fn retain(
        &self,
        policy: &RetentionPolicy,
    ) -> Result<Vec<(ImageReference, Kept)>, CriError> {
        if !policy.removes_anything() || self.tracker().retention().is_empty() {
            self.observe_unwanted();
            return Ok(Vec::new());
        }
        let used = match policy.high_watermark {
            Some(_) => Some(
                self.cri
                    .image_fs_used_bytes()
                    .await
                    .inspect_err(|e| self.cri_error(e))?,
            ),
            None => None,
        };
        let plan = self
            .tracker()
            .retention()
            .plan(policy, SystemTime::now(), used);
        if plan.is_empty() {
            self.observe_unwanted();
            return Ok(Vec::new());
        }
        let in_use: BTreeSet<String> = self
            .cri
            .images_in_use()
            .await
            .inspect_err(|e| self.cri_error(e))?
            .into_iter()
            .collect();
        let wanted_ids: BTreeSet<String> = self
            .tracker()
            .records()
            .filter_map(|r| r.held.as_ref().map(|h| h.image_id.clone()))
            .collect();
        let mut kept = Vec::new();
        let mut freed = 0u64;
        let candidates = plan
            .expired
            .iter()
            .map(|r| (r, RemovalReason::Grace))
            .chain(plan.pressure.iter().map(|r| (r, RemovalReason::Watermark)));
        for (reference, reason) in candidates {
            if reason == RemovalReason::Watermark && freed >= plan.to_free {
                break;
            }
            let name = reference.to_string();
            let Some(image) = self
                .cri
                .image_status(&name)
                .await
                .inspect_err(|e| self.cri_error(e))?
            else {
                self.tracker().retention_mut().forget(reference);
                continue;
            };
            if let Some(why) = keep_unwanted(&image, &name, &in_use, &wanted_ids) {
                info!(image = %name, ?why, "not removing an unwanted image");
                self.tracker()
                    .retention_mut()
                    .set_kept(reference, Some(why.to_string()));
                kept.push((reference.clone(), why));
                continue;
            }
            self.cri
                .remove(&name)
                .await
                .inspect_err(|e| self.cri_error(e))?;
            if reason == RemovalReason::Watermark {
                freed = freed.saturating_add(image.size);
            }
            let mut tracker = self.tracker();
            let retention = tracker.retention_mut();
            if let Some(gone) = retention.forget(reference) {
                retention.removed(&gone, reason, SystemTime::now());
            }
            drop(tracker);
            self.metrics
                .removed
                .with_label_values(&[reason.as_str()])
                .inc();
            info!(image = %name, reason = reason.as_str(), "removed an image no ImageSet wants");
        }
        self.observe_unwanted();
        self.changed();
        Ok(kept)
    }

    /// Resolves an available tag again: the runtime pulls it, which transfers the manifest
    /// only when the tag has not moved, and the new content when it has.
    async fn refresh(self: Arc<Self>, image: ImageReference) {
        let Ok(_permit) = self.pulls.acquire().await else {
            return;
        };
        let keyring = self.keyring_of(&image);
        let before = self
            .tracker()
            .get(&image)
            .and_then(|r| r.held.as_ref().and_then(|h| h.digest.clone()));
        let held = match pull_with(&self.cri, &image, &keyring.lookup(&image)).await {
            Ok(()) => self.held_now(&image).await,
            Err(error) => {
                self.cri_error(&error.cri);
                warn!(%image, %error, "cannot resolve the tag again; keeping what the node holds");
                None
            }
        };
        let resolved = held.is_some();
        let after = held.as_ref().and_then(|h| h.digest.clone());
        let size = held.as_ref().map_or(0, |h| h.size);
        let moved = self.tracker().refreshed(&image, held);
        let result = match (resolved, moved) {
            (false, _) => "failed",
            (true, true) => "moved",
            (true, false) => "unchanged",
        };
        self.metrics.refreshes.with_label_values(&[result]).inc();
        if moved {
            self.metrics.pulls.with_label_values(&["success"]).inc();
            self.metrics.pulled_bytes.inc_by(size);
            info!(%image, from = ?before, to = ?after, "the tag moved; pulled its new content");
        }
        self.changed();
        self.wake.notify_one();
    }

    /// Pins the available wanted images not pinned yet and releases the unwanted ones, on a
    /// runtime with containerd's images service. An image pulled again (it vanished) is
    /// pinned again; after a restart every image is pinned or released once more.
    async fn sync_pins(&self) {
        let Some(pinner) = self
            .pinner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return;
        };
        let (pin, release) = {
            let tracker = self.tracker();
            let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
            let available: std::collections::HashSet<String> = tracker
                .records()
                .filter(|r| r.state == ImageState::Available && r.held.is_some())
                .map(|r| r.reference.to_string())
                .collect();
            let unwanted: std::collections::HashSet<String> = tracker
                .retention()
                .unwanted()
                .map(|u| u.reference.to_string())
                .collect();
            pins.pinned.retain(|name| available.contains(name));
            pins.released.retain(|name| unwanted.contains(name));
            let pin: Vec<String> = available
                .iter()
                .filter(|name| !pins.pinned.contains(*name))
                .cloned()
                .collect();
            let release: Vec<String> = unwanted
                .iter()
                .filter(|name| !pins.released.contains(*name))
                .cloned()
                .collect();
            (pin, release)
        };
        for (names, pinned) in [(pin, true), (release, false)] {
            for name in names {
                match pinner.set(&name, pinned).await {
                    Ok(()) | Err(PinError::NotFound) => {
                        let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
                        if pinned {
                            pins.pinned.insert(name);
                        } else {
                            pins.released.insert(name);
                        }
                    }
                    Err(PinError::Unsupported) => {
                        info!(
                            "the runtime has no containerd images service: images are not pinned against the kubelet's image garbage collection"
                        );
                        *self.pinner.lock().unwrap_or_else(PoisonError::into_inner) = None;
                        return;
                    }
                    Err(error) => {
                        self.metrics
                            .cri_errors
                            .with_label_values(&["Images.Update", "failed"])
                            .inc();
                        warn!(image = %name, pinned, %error, "cannot change the image's pinned label; trying again on the next resync");
                    }
                }
            }
        }
        let count = self
            .pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pinned
            .len();
        self.metrics
            .pinned_images
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Takes up the unwanted images and removals a NodeImage recorded.
    pub fn restore_retention(&self, status: &crate::api::NodeImageStatus) {
        let mut tracker = self.tracker();
        let wanted: BTreeSet<String> = tracker.records().map(|r| r.reference.to_string()).collect();
        let retention = tracker.retention_mut();
        retention.restore(&status.unwanted, &status.removals);
        for image in &status.unwanted {
            if wanted.contains(&image.image)
                && let Ok(reference) = ImageReference::parse(&image.image)
            {
                retention.wanted(&reference);
            }
        }
        drop(tracker);
        self.changed();
    }

    fn observe_unwanted(&self) {
        let tracker = self.tracker();
        let retention = tracker.retention();
        let count = retention.unwanted().count();
        let bytes = retention.bytes();
        drop(tracker);
        self.metrics
            .unwanted_images
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.metrics
            .unwanted_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// Why an unwanted image must stay, if it must: a container uses it (by ID, by the name it was
/// wanted under, or by any of its tags), or a wanted image has the same content.
pub fn keep_unwanted(
    image: &RuntimeImage,
    name: &str,
    in_use: &BTreeSet<String>,
    wanted_ids: &BTreeSet<String>,
) -> Option<Kept> {
    if in_use.contains(&image.id)
        || in_use.contains(name)
        || image.repo_tags.iter().any(|t| in_use.contains(t))
    {
        Some(Kept::InUse(image.id.clone()))
    } else if wanted_ids.contains(&image.id) {
        Some(Kept::SharedWithWanted(image.id.clone()))
    } else {
        None
    }
}

/// A pull that failed, with the credentials tried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{cri}{}", tried(.credentials))]
pub struct PullError {
    pub cri: CriError,
    /// Keys of the credentials tried, in order.
    pub credentials: Vec<String>,
}

fn tried(credentials: &[String]) -> String {
    if credentials.is_empty() {
        String::new()
    } else {
        format!(" (credentials tried: {})", credentials.join(", "))
    }
}

/// Whether a failed pull may succeed with other credentials.
fn is_auth_failure(error: &CriError) -> bool {
    let message = error.message.to_ascii_lowercase();
    matches!(
        error.code,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    ) || message.contains("401")
        || message.contains("403")
        || message.contains("unauthorized")
        || message.contains("denied")
}

/// Pulls with each matching credential in turn (none when none match), moving on only when
/// the registry refused the credential.
pub async fn pull_with(
    cri: &Cri,
    image: &ImageReference,
    credentials: &[&Credential],
) -> Result<(), PullError> {
    let name = image.to_string();
    if credentials.is_empty() {
        return cri
            .pull(&name, None)
            .await
            .map(drop)
            .map_err(|cri| PullError {
                cri,
                credentials: Vec::new(),
            });
    }
    let mut tried = Vec::new();
    let mut last = None;
    for credential in credentials {
        tried.push(credential.server.clone());
        match cri.pull(&name, Some(credential.to_auth_config())).await {
            Ok(_) => return Ok(()),
            Err(error) if is_auth_failure(&error) => last = Some(error),
            Err(error) => {
                return Err(PullError {
                    cri: error,
                    credentials: tried,
                });
            }
        }
    }
    Err(PullError {
        cri: last.unwrap_or_else(|| CriError {
            operation: "PullImage",
            code: tonic::Code::Unknown,
            message: "no attempt made".to_string(),
        }),
        credentials: tried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwanted_images_in_use_or_shared_with_wanted_ones_are_kept() {
        let image = RuntimeImage {
            id: "sha256:aaa".into(),
            repo_tags: vec![
                "docker.io/library/nginx:1.27".into(),
                "docker.io/library/nginx:1".into(),
            ],
            repo_digests: vec![],
            size: 1,
        };
        let name = "docker.io/library/nginx:1.27";
        let set = |items: &[&str]| {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<BTreeSet<_>>()
        };
        let none = BTreeSet::new();
        assert_eq!(keep_unwanted(&image, name, &none, &none), None);
        for used in [
            "sha256:aaa",
            "docker.io/library/nginx:1.27",
            "docker.io/library/nginx:1",
        ] {
            assert_eq!(
                keep_unwanted(&image, name, &set(&[used]), &none),
                Some(Kept::InUse("sha256:aaa".into())),
                "{used}"
            );
        }
        assert_eq!(
            keep_unwanted(&image, name, &none, &set(&["sha256:aaa"])),
            Some(Kept::SharedWithWanted("sha256:aaa".into()))
        );
    }

    #[test]
    fn only_refused_credentials_move_on_to_the_next() {
        let error = |code, message: &str| CriError {
            operation: "PullImage",
            code,
            message: message.to_string(),
        };
        assert!(is_auth_failure(&error(
            tonic::Code::Unknown,
            "pulling from host r failed with status code [manifests 1]: 401 Unauthorized"
        )));
        assert!(is_auth_failure(&error(
            tonic::Code::Unknown,
            "403 Forbidden"
        )));
        assert!(is_auth_failure(&error(tonic::Code::Unauthenticated, "")));
        assert!(!is_auth_failure(&error(
            tonic::Code::NotFound,
            "r/x:1: not found"
        )));
        assert!(!is_auth_failure(&error(
            tonic::Code::Unknown,
            "dial tcp: connection refused"
        )));
    }
}
