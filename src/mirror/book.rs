//! What the mirror worker knows and decides, apart from its I/O: the images each mirroring
//! ImageSet wants copied, the state of each copy, which copies are due (new, moved to another
//! registry or platform list, failed and past their backoff, or mirrored and due for a check of
//! the source tag), and the status fields the controller writes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::copy::{Copied, MirrorError};
use super::plan::{MirrorTarget, Platform, mirror_reference};
use crate::api::{ImageMirrorStatus, ImageSet, MirrorState, Registry, RetiringCopy};
use crate::image::ImageReference;

/// The longest wait between two attempts at a failing copy.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One image of one ImageSet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageKey {
    pub namespace: String,
    pub name: String,
    /// The normalized reference.
    pub image: String,
}

/// A copy an ImageSet asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub key: ImageKey,
    pub source: ImageReference,
    /// The `Registry` to copy into.
    pub registry: String,
    pub platforms: Vec<Platform>,
    /// `(namespace, name)` of the ImageSet's pull secrets.
    pub pull_secrets: Vec<(String, String)>,
    /// How often the source tag is compared with the copy (`spec.refresh`), when the
    /// ImageSet says.
    pub refresh: Option<Duration>,
}

/// The copies `set` asks for: none unless it mirrors and is not being deleted. References
/// that do not parse are left out (the ImageSet's status says they are invalid); platforms
/// that do not parse are an error for the whole set.
pub fn wanted(set: &ImageSet) -> Result<Vec<Wanted>, String> {
    let Some(mirror) = &set.spec.mirror else {
        return Ok(Vec::new());
    };
    if set.metadata.deletion_timestamp.is_some() {
        return Ok(Vec::new());
    }
    let platforms = mirror
        .platforms
        .iter()
        .map(|p| {
            p.parse::<Platform>()
                .map_err(|e| format!("spec.mirror.platforms: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let refresh = set
        .spec
        .refresh
        .as_deref()
        .map(|text| crate::time::parse_duration(text).map_err(|e| format!("spec.refresh: {e}")))
        .transpose()?
        .map(|period| period.max(crate::index::MIN_REFRESH));
    let namespace = set.namespace().unwrap_or_default();
    let pull_secrets: Vec<(String, String)> = set
        .spec
        .image_pull_secrets
        .iter()
        .map(|s| (namespace.clone(), s.name.clone()))
        .collect();
    let mut seen = BTreeSet::new();
    Ok(set
        .spec
        .images
        .iter()
        .filter_map(|raw| ImageReference::parse(raw).ok())
        .filter(|source| seen.insert(source.to_string()))
        .map(|source| Wanted {
            key: ImageKey {
                namespace: namespace.clone(),
                name: set.name_any(),
                image: source.to_string(),
            },
            source,
            registry: mirror.registry.clone(),
            platforms: platforms.clone(),
            pull_secrets: pull_secrets.clone(),
            refresh,
        })
        .collect())
}

/// Whether an endpoint may be spoken to over plain HTTP: a loopback address, a cluster-local
/// name (`*.svc`, `*.cluster.local`) or a private address (RFC 1918, `fc00::/7`).
pub fn may_use_plain_http(target: &MirrorTarget) -> bool {
    let endpoint = target.endpoint();
    if super::plan::is_loopback(endpoint) {
        return true;
    }
    let host = match endpoint.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => endpoint,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let lower = host.to_ascii_lowercase();
    if lower.ends_with(".svc") || lower.ends_with(".cluster.local") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_private(),
        Ok(std::net::IpAddr::V6(ip)) => (ip.segments()[0] & 0xfe00) == 0xfc00,
        Err(_) => false,
    }
}

/// How Coral reaches a Registry, read from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The endpoint as nodes reach it: mirror references name it.
    pub target: MirrorTarget,
    /// Where Coral copies to: the push endpoint with the endpoint's prefix, or the endpoint.
    pub push: MirrorTarget,
    /// `push` is spoken to over plain HTTP.
    pub plain_http: bool,
}

/// The destination a Registry's spec describes, or why it is unusable.
pub fn destination(registry: &Registry) -> Result<Destination, String> {
    let target: MirrorTarget = registry
        .spec
        .endpoint
        .parse()
        .map_err(|e| format!("spec.endpoint: {e}"))?;
    let push = match &registry.spec.push_endpoint {
        Some(host) => target
            .at(host)
            .map_err(|e| format!("spec.pushEndpoint: {e}"))?,
        None => target.clone(),
    };
    // Loopback is plain HTTP, as containerd treats it, unless a CA says the registry speaks TLS.
    let plain_http = registry.spec.tls.plain_http
        || (push.is_loopback() && registry.spec.tls.ca_secret.is_none());
    if registry.spec.tls.plain_http && !may_use_plain_http(&push) {
        return Err(format!(
            "spec.tls.plainHTTP is allowed only for a loopback, cluster-local (*.svc, *.cluster.local) or private address, not {}",
            push.endpoint()
        ));
    }
    Ok(Destination {
        target,
        push,
        plain_http,
    })
}

/// The failure reasons counted in metrics.
pub fn failure_reason(error: &MirrorError) -> &'static str {
    match error {
        MirrorError::Plan(_) => "invalid",
        MirrorError::Digest { .. } => "digest",
        MirrorError::Registry { .. } if error.on_source() => "source",
        MirrorError::Registry { .. } => "mirror",
    }
}

/// The wait after `failures` failed attempts in a row: 1 s doubled per failure, at most
/// [`MAX_BACKOFF`], scaled by `jitter` (0 to 1) between 75 % and 125 %.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1 << failures.saturating_sub(1).min(16));
    base.min(MAX_BACKOFF)
        .mul_f64(0.75 + jitter.clamp(0.0, 1.0) / 2.0)
}

#[derive(Debug, Clone)]
struct Entry {
    status: ImageMirrorStatus,
    registry: String,
    target: Option<MirrorTarget>,
    platforms: Vec<Platform>,
    failures: u32,
    /// When the copy is due again; `None` while it runs.
    due: Option<Instant>,
    /// The ImageSet's `spec.refresh`, instead of the book's recheck period.
    refresh: Option<Duration>,
}

/// How a finished attempt went.
#[derive(Debug)]
pub enum Attempt {
    Copied(Box<Copied>),
    /// The Registry is missing or unusable, or its secrets cannot be read.
    Unusable(String),
    Failed(MirrorError),
}

/// The mirror state of every wanted image.
#[derive(Debug)]
pub struct Book {
    entries: BTreeMap<ImageKey, Entry>,
    /// How often a mirrored image's source tag is compared with the mirror.
    recheck: Duration,
    /// Copies no ImageSet mirrors any more, by Registry and mirror reference.
    retired: BTreeMap<(String, String), RetiringCopy>,
}

impl Book {
    pub fn new(recheck: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            recheck,
            retired: BTreeMap::new(),
        }
    }

    /// Takes up what an ImageSet's status says of its copies (after a restart, or a new
    /// leader): they keep their state, and are checked against the source at once, which
    /// copies nothing the mirror holds.
    pub fn seed(&mut self, set: &ImageSet, now: Instant) {
        let Some(mirror) = &set.spec.mirror else {
            return;
        };
        let namespace = set.namespace().unwrap_or_default();
        for image in set.status.iter().flat_map(|s| &s.images) {
            let Some(status) = &image.mirror else {
                continue;
            };
            let key = ImageKey {
                namespace: namespace.clone(),
                name: set.name_any(),
                image: image.normalized.clone(),
            };
            self.entries.entry(key).or_insert_with(|| Entry {
                status: status.clone(),
                registry: mirror.registry.clone(),
                target: None,
                platforms: Vec::new(),
                failures: 0,
                due: Some(now),
                refresh: None,
            });
        }
    }

    /// The copies to start now, given what is wanted and where each Registry is (`None`
    /// for a Registry that is missing or unusable; such copies are due too, and fail with
    /// the reason). Entries no longer wanted are dropped. The copies returned count as
    /// running until [`Book::finish`].
    pub fn due(
        &mut self,
        wanted: &[Wanted],
        targets: &BTreeMap<String, Option<MirrorTarget>>,
        now: Instant,
    ) -> Vec<Wanted> {
        let keys: BTreeSet<&ImageKey> = wanted.iter().map(|w| &w.key).collect();
        self.entries.retain(|key, _| keys.contains(key));
        let mut due = Vec::new();
        for want in wanted {
            let target = targets.get(&want.registry).cloned().flatten();
            let reference = target
                .as_ref()
                .and_then(|t| mirror_reference(&want.source, t).ok())
                .map(|r| r.to_string())
                .unwrap_or_default();
            let entry = self
                .entries
                .entry(want.key.clone())
                .or_insert_with(|| Entry {
                    status: ImageMirrorStatus {
                        reference: reference.clone(),
                        ..ImageMirrorStatus::default()
                    },
                    registry: want.registry.clone(),
                    target: target.clone(),
                    platforms: want.platforms.clone(),
                    failures: 0,
                    due: Some(now),
                    refresh: want.refresh,
                });
            if entry.refresh != want.refresh {
                // A shorter period applies from now on, not after the current wait.
                if let (Some(period), Some(due)) = (want.refresh, entry.due) {
                    entry.due = Some(due.min(now + period));
                }
                entry.refresh = want.refresh;
            }
            let seeded = entry.target.is_none() && entry.status.reference == reference;
            if seeded {
                // Taken up from a status: the same copy, if the reference still matches.
                entry.target = target.clone();
                entry.platforms = want.platforms.clone();
            }
            let moved = entry.registry != want.registry
                || entry.target != target
                || entry.platforms != want.platforms;
            if moved {
                *entry = Entry {
                    status: ImageMirrorStatus {
                        reference,
                        ..ImageMirrorStatus::default()
                    },
                    registry: want.registry.clone(),
                    target,
                    platforms: want.platforms.clone(),
                    failures: 0,
                    due: Some(now),
                    refresh: want.refresh,
                };
            }
            if entry.due.is_some_and(|at| at <= now) {
                entry.due = None;
                due.push(want.clone());
            }
        }
        self.unretire_held();
        due
    }

    /// Records how an attempt went. A copy that was mirrored stays mirrored when the source
    /// cannot be read (the mirror still holds it), with the error kept; otherwise a failure
    /// makes it `failed`. `jitter` (0 to 1) spreads the retries.
    pub fn finish(
        &mut self,
        key: &ImageKey,
        attempt: &Attempt,
        now: Instant,
        wall: &Time,
        jitter: f64,
    ) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.status.last_checked = Some(wall.clone());
        match attempt {
            Attempt::Copied(copied) => {
                entry.failures = 0;
                entry.status.state = MirrorState::Mirrored;
                entry.status.reference = copied.mirror.to_string();
                entry.status.source_digest = Some(copied.source_digest.clone());
                entry.status.digest = Some(copied.mirror_digest.clone());
                if let Some(size) = copied.size_bytes {
                    entry.status.size_bytes = i64::try_from(size).ok();
                }
                entry.status.last_error = None;
                entry.due = Some(now + entry.refresh.unwrap_or(self.recheck));
            }
            Attempt::Unusable(error) => {
                entry.failures += 1;
                entry.status.state = MirrorState::Failed;
                entry.status.last_error = Some(error.clone());
                entry.due = Some(now + backoff(entry.failures, jitter));
            }
            Attempt::Failed(error) => {
                entry.failures += 1;
                let keeps = entry.status.state == MirrorState::Mirrored
                    && matches!(error, MirrorError::Registry { .. })
                    && error.on_source();
                if !keeps {
                    entry.status.state = MirrorState::Failed;
                }
                entry.status.last_error = Some(error.to_string());
                entry.due = Some(now + backoff(entry.failures, jitter));
            }
        }
    }

    /// The status of one image's copy, once the worker has seen it.
    pub fn status(&self, key: &ImageKey) -> Option<&ImageMirrorStatus> {
        self.entries.get(key).map(|e| &e.status)
    }

    /// The copies of one ImageSet, by normalized reference.
    pub fn of_set(&self, namespace: &str, name: &str) -> BTreeMap<String, ImageMirrorStatus> {
        self.entries
            .iter()
            .filter(|(k, _)| k.namespace == namespace && k.name == name)
            .map(|(k, e)| (k.image.clone(), e.status.clone()))
            .collect()
    }

    /// Distinct mirror references held by `registry`.
    pub fn mirrored_in(&self, registry: &str) -> usize {
        self.entries
            .values()
            .filter(|e| e.registry == registry && e.status.state == MirrorState::Mirrored)
            .map(|e| &e.status.reference)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// The size of the distinct mirror references `registry` holds, when every one is known.
    pub fn mirrored_bytes_in(&self, registry: &str) -> Option<u64> {
        let sizes: BTreeMap<&String, Option<i64>> = self
            .entries
            .values()
            .filter(|e| e.registry == registry && e.status.state == MirrorState::Mirrored)
            .map(|e| (&e.status.reference, e.status.size_bytes))
            .collect();
        sizes
            .values()
            .map(|size| size.and_then(|s| u64::try_from(s).ok()))
            .sum()
    }

    /// Moves the mirrored copies no ImageSet wants any more (given what is wanted now) to the
    /// retired ones, as of `wall`. Call it before [`Book::due`], which forgets the entries no
    /// longer wanted, and takes a copy wanted again out of the retired ones.
    pub fn retire(&mut self, wanted: &[Wanted], wall: &Time) {
        let by_key: BTreeMap<&ImageKey, &Wanted> = wanted.iter().map(|w| (&w.key, w)).collect();
        self.retire_where(wall, |key, entry| {
            by_key
                .get(key)
                .is_none_or(|want| want.registry != entry.registry)
        });
    }

    /// Retires the mirrored copies of one ImageSet (being deleted), as of `wall`; the entries
    /// go at the next [`Book::due`], which keeps a copy another ImageSet wants.
    pub fn retire_set(&mut self, namespace: &str, name: &str, wall: &Time) {
        self.retire_where(wall, |key, _| {
            key.namespace == namespace && key.name == name
        });
    }

    /// Retires, as of `wall`, the mirrored copies of the entries `gone` picks.
    fn retire_where(&mut self, wall: &Time, gone: impl Fn(&ImageKey, &Entry) -> bool) {
        for (key, entry) in &self.entries {
            if !gone(key, entry) || entry.status.state != MirrorState::Mirrored {
                continue;
            }
            let Some(digest) = entry.status.digest.clone() else {
                continue;
            };
            self.retired
                .entry((entry.registry.clone(), entry.status.reference.clone()))
                .or_insert_with(|| RetiringCopy {
                    reference: entry.status.reference.clone(),
                    digest,
                    since: wall.clone(),
                    kept: None,
                });
        }
    }

    /// Retired copies that are (again) the copy of a wanted image are not retired.
    fn unretire_held(&mut self) {
        let held: BTreeSet<(&String, &String)> = self
            .entries
            .values()
            .map(|entry| (&entry.registry, &entry.status.reference))
            .collect();
        self.retired
            .retain(|(registry, reference), _| !held.contains(&(registry, reference)));
    }

    /// Takes up the retiring copies a Registry's status records (after a restart, or a new
    /// leader): they keep the time they were retired.
    pub fn seed_retired(&mut self, registry: &str, copies: &[RetiringCopy]) {
        for copy in copies {
            self.retired
                .entry((registry.to_string(), copy.reference.clone()))
                .or_insert_with(|| copy.clone());
        }
    }

    /// The retired copies of `registry`, for its status.
    pub fn retiring_in(&self, registry: &str) -> Vec<RetiringCopy> {
        self.retired
            .iter()
            .filter(|((r, _), _)| r == registry)
            .map(|(_, copy)| copy.clone())
            .collect()
    }

    /// The retired copies past `retention` at `now`, as `(registry, copy)`. A copy whose
    /// digest a wanted copy in the same repository serves too stays (deleting a manifest
    /// deletes it under every tag), with the reason.
    pub fn retired_due(
        &mut self,
        retention: Duration,
        now: std::time::SystemTime,
    ) -> Vec<(String, RetiringCopy)> {
        let served: BTreeSet<(String, String, String)> = self
            .entries
            .values()
            .filter(|e| e.status.state == MirrorState::Mirrored)
            .filter_map(|e| {
                let reference = ImageReference::parse(&e.status.reference).ok()?;
                Some((
                    e.registry.clone(),
                    reference.name(),
                    e.status.digest.clone()?,
                ))
            })
            .collect();
        let mut due = Vec::new();
        for ((registry, _), copy) in &mut self.retired {
            let since = std::time::SystemTime::from(copy.since.0);
            if now.duration_since(since).unwrap_or_default() < retention {
                continue;
            }
            let name = ImageReference::parse(&copy.reference)
                .map(|r| r.name())
                .unwrap_or_default();
            if served.contains(&(registry.clone(), name, copy.digest.clone())) {
                copy.kept =
                    Some("a reference ImageSets still mirror serves the same digest".to_string());
                continue;
            }
            due.push((registry.clone(), copy.clone()));
        }
        due
    }

    /// Records why a retired copy stays (`None`: it is being deleted).
    pub fn set_retired_kept(&mut self, registry: &str, reference: &str, why: Option<String>) {
        if let Some(copy) = self
            .retired
            .get_mut(&(registry.to_string(), reference.to_string()))
        {
            copy.kept = why;
        }
    }

    /// Forgets a retired copy (deleted, or its Registry gone).
    pub fn forget_retired(&mut self, registry: &str, reference: &str) {
        self.retired
            .remove(&(registry.to_string(), reference.to_string()));
    }

    /// Forgets the retired copies of Registries that are gone.
    pub fn keep_retired_of(&mut self, registries: &BTreeSet<String>) {
        self.retired
            .retain(|(registry, _), _| registries.contains(registry));
    }

    /// Copies by state, for the metric.
    pub fn by_state(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> = [
            MirrorState::Copying,
            MirrorState::Mirrored,
            MirrorState::Failed,
        ]
        .into_iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        for entry in self.entries.values() {
            *counts.entry(entry.status.state.as_str()).or_default() += 1;
        }
        counts
    }

    /// The soonest a copy is due, if one waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.due).min()
    }
}
