//! Where each wanted image stands on this node, and when it may be pulled next. Pure: the pull
//! engine feeds it what the runtime holds and how pulls ended, and asks it what to pull.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::cri::RuntimeImage;
use super::retention::Retention;
use crate::api::ImageState;
use crate::credentials::Keyring;
use crate::image::ImageReference;

/// Backoff between failed pulls of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay after the first failure; doubled after each further one.
    pub initial: Duration,
    /// The longest delay, and the delay between retries once an image is `failed`.
    pub max: Duration,
    /// Failures after which an image is `failed`.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(600),
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// Delay after `failures` failures, with `jitter` in `[0, 1)` spreading it over
    /// 80–120%, never above `max`.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let base = self.initial.saturating_mul(1 << exponent).min(self.max);
        base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
            .min(self.max)
    }
}

/// What the runtime holds of one reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub image_id: String,
    /// `name@sha256:…` of the reference's repository, when the runtime knows it.
    pub digest: Option<String>,
    pub size: u64,
}

/// The runtime's images, indexed by normalized `name:tag` and `name@digest`.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    by_reference: HashMap<String, usize>,
    images: Vec<RuntimeImage>,
}

impl Inventory {
    pub fn new(images: Vec<RuntimeImage>) -> Self {
        let mut by_reference = HashMap::new();
        for (i, image) in images.iter().enumerate() {
            for name in image.repo_tags.iter().chain(&image.repo_digests) {
                if let Ok(reference) = ImageReference::parse(name) {
                    by_reference.insert(reference.to_string(), i);
                }
            }
        }
        Self {
            by_reference,
            images,
        }
    }

    /// What the runtime holds of a reference: by digest when the reference has one, by tag
    /// otherwise.
    pub fn find(&self, reference: &ImageReference) -> Option<Held> {
        let key = match reference.digest() {
            Some(digest) => format!("{}@{digest}", reference.name()),
            None => reference.to_string(),
        };
        let image = &self.images[*self.by_reference.get(&key)?];
        Some(held(image, reference))
    }
}

/// What a runtime image means for one reference.
pub fn held(image: &RuntimeImage, reference: &ImageReference) -> Held {
    let name = reference.name();
    let digest = image
        .repo_digests
        .iter()
        .filter_map(|d| ImageReference::parse(d).ok())
        .find(|d| d.name() == name)
        .and_then(|d| d.digest().map(str::to_string));
    Held {
        image_id: image.id.clone(),
        digest,
        size: image.size,
    }
}

/// One wanted image.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    pub reference: ImageReference,
    pub state: ImageState,
    /// Failed pulls since the image was last available.
    pub attempts: u32,
    pub last_error: Option<String>,
    pub held: Option<Held>,
    /// Wall-clock time of the last state change.
    pub transitioned: SystemTime,
    /// No pull before this instant.
    pub not_before: Option<Instant>,
    pub in_flight: bool,
    /// Times the image disappeared after being available.
    pub vanished: u32,
    /// Successful pulls by this engine (0 when the runtime already held the image).
    pub pulls: u32,
    /// Credentials to try, from the pull secrets of the ImageSets that want the image.
    pub keyring: Arc<Keyring>,
    /// Whether the runtime was looked at since the image became wanted: until then the
    /// agent does not know whether the node holds it.
    pub looked: bool,
    /// When the tag was last resolved: pulled, found held, or refreshed.
    pub resolved: Option<Instant>,
    /// [`Tracker`]'s count of ended pulls and refreshes when this image's last one ended: a
    /// listing of the runtime begun before that may not show what it brought.
    pub ended_at: u64,
}

impl ImageRecord {
    fn set_state(&mut self, state: ImageState) {
        if self.state != state {
            self.state = state;
            self.transitioned = SystemTime::now();
        }
    }
}

/// Counts of images by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub wanted: usize,
    pub available: usize,
    pub pulling: usize,
    pub failed: usize,
    pub paused: usize,
}

/// What one look at the runtime changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Images that were available and are gone.
    pub vanished: usize,
    /// Whether any record changed.
    pub changed: bool,
}

/// Where the tracker stood when a listing of the runtime's images began
/// ([`Tracker::listing`]): what [`Tracker::observe_listing`] may judge by that listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listing(u64);

/// The wanted images, by normalized reference.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    records: BTreeMap<String, ImageRecord>,
    policy: RetryPolicy,
    /// Whether the runtime's images were listed at least once.
    listed: bool,
    /// Pulls and refreshes ended so far.
    ended: u64,
    /// Images held for ImageSets that no longer want them.
    retention: Retention,
}

impl Tracker {
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            records: BTreeMap::new(),
            policy,
            listed: false,
            ended: 0,
            retention: Retention::default(),
        }
    }

    /// Marks the start of a listing of the runtime's images, to hand to
    /// [`Tracker::observe_listing`] with what it returns.
    pub fn listing(&self) -> Listing {
        Listing(self.ended)
    }

    /// Counts an ended pull or refresh; returns its number.
    fn end(&mut self) -> u64 {
        self.ended += 1;
        self.ended
    }

    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    pub fn retention_mut(&mut self) -> &mut Retention {
        &mut self.retention
    }

    /// Replaces the wanted set; returns the records no longer wanted. Records of images still
    /// wanted keep their state and backoff.
    pub fn set_wanted(
        &mut self,
        wanted: impl IntoIterator<Item = (ImageReference, Arc<Keyring>)>,
    ) -> Vec<ImageRecord> {
        let mut next = BTreeMap::new();
        for (reference, keyring) in wanted {
            let key = reference.to_string();
            let record = self.records.remove(&key).unwrap_or_else(|| ImageRecord {
                reference,
                state: ImageState::Pulling,
                attempts: 0,
                last_error: None,
                held: None,
                transitioned: SystemTime::now(),
                not_before: None,
                in_flight: false,
                vanished: 0,
                pulls: 0,
                keyring: keyring.clone(),
                looked: false,
                resolved: None,
                ended_at: 0,
            });
            self.retention.wanted(&record.reference);
            next.insert(key, ImageRecord { keyring, ..record });
        }
        let removed: Vec<ImageRecord> = std::mem::replace(&mut self.records, next)
            .into_values()
            .collect();
        let now = SystemTime::now();
        for record in &removed {
            if let Some(held) = &record.held {
                self.retention.left(
                    record.reference.clone(),
                    held.size,
                    held.digest.clone(),
                    now,
                );
            }
        }
        removed
    }

    /// Brings the records in line with what the runtime holds now (a listing that saw every
    /// pull and refresh ended so far). `paused` holds back new pulls.
    pub fn observe(&mut self, inventory: &Inventory, now: Instant, paused: bool) -> Observed {
        let listing = self.listing();
        self.observe_listing(inventory, listing, now, paused)
    }

    /// Brings the records in line with `inventory`, what a listing begun at `listing` found.
    /// An image whose pull or refresh ended after the listing began is left as that ended:
    /// the listing may predate it (an image pulled meanwhile would look gone, a tag refreshed
    /// meanwhile would look unmoved), and the next listing judges it.
    pub fn observe_listing(
        &mut self,
        inventory: &Inventory,
        listing: Listing,
        now: Instant,
        paused: bool,
    ) -> Observed {
        let mut observed = Observed {
            changed: !self.listed,
            ..Observed::default()
        };
        self.listed = true;
        let gone: Vec<ImageReference> = self
            .retention
            .unwanted()
            .filter(|u| inventory.find(&u.reference).is_none())
            .map(|u| u.reference.clone())
            .collect();
        for reference in gone {
            // Removed by someone else (the kubelet's image GC, an operator): nothing to do.
            self.retention.forget(&reference);
            observed.changed = true;
        }
        let policy = self.policy;
        for record in self.records.values_mut() {
            if record.in_flight || Listing(record.ended_at) > listing {
                continue;
            }
            observed.changed |= !record.looked;
            record.looked = true;
            let before = (record.state, record.held.clone(), record.not_before);
            match inventory.find(&record.reference) {
                Some(held) => {
                    record.resolved.get_or_insert(now);
                    record.held = Some(held);
                    record.attempts = 0;
                    record.last_error = None;
                    record.not_before = None;
                    record.set_state(ImageState::Available);
                }
                None => {
                    record.held = None;
                    if record.state == ImageState::Available {
                        // Removed behind our back (kubelet image GC): pull again, but back off
                        // so a node that keeps collecting it is not thrashed.
                        record.vanished += 1;
                        observed.vanished += 1;
                        record.not_before = Some(now + policy.delay(record.vanished, 0.5));
                        record.set_state(ImageState::Pulling);
                    }
                    if paused && record.state == ImageState::Pulling {
                        record.set_state(ImageState::Paused);
                    } else if !paused && record.state == ImageState::Paused {
                        record.set_state(ImageState::Pulling);
                    }
                }
            }
            observed.changed |= before != (record.state, record.held.clone(), record.not_before);
        }
        observed
    }

    /// Whether the runtime's images were listed at least once: before that, the records say
    /// nothing about what the node holds.
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// Images to pull now: not available, not being pulled, not paused, past their backoff.
    pub fn due(&self, now: Instant) -> Vec<ImageReference> {
        self.records
            .values()
            .filter(|r| matches!(r.state, ImageState::Pulling | ImageState::Failed))
            .filter(|r| !r.in_flight && r.not_before.is_none_or(|t| t <= now))
            .map(|r| r.reference.clone())
            .collect()
    }

    /// The earliest instant a backed-off image becomes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.records
            .values()
            .filter(|r| matches!(r.state, ImageState::Pulling | ImageState::Failed))
            .filter(|r| !r.in_flight)
            .filter_map(|r| r.not_before)
            .min()
    }

    /// Marks a pull as started; `false` when one is already under way or the image is not
    /// wanted (so no image is ever pulled twice at once).
    pub fn start(&mut self, reference: &ImageReference) -> bool {
        match self.records.get_mut(&reference.to_string()) {
            Some(record) if !record.in_flight => {
                record.in_flight = true;
                true
            }
            _ => false,
        }
    }

    /// Records a pull that succeeded.
    pub fn succeeded(&mut self, reference: &ImageReference, held: Option<Held>) {
        let ended = self.end();
        if let Some(record) = self.records.get_mut(&reference.to_string()) {
            record.ended_at = ended;
            record.in_flight = false;
            record.attempts = 0;
            record.last_error = None;
            record.not_before = None;
            record.held = held;
            record.pulls += 1;
            record.resolved = Some(Instant::now());
            record.set_state(ImageState::Available);
        }
    }

    /// Available images referenced by tag whose `periods` entry says they are due to be
    /// resolved again.
    pub fn refresh_due(
        &self,
        now: Instant,
        periods: &HashMap<ImageReference, Duration>,
    ) -> Vec<ImageReference> {
        self.records
            .values()
            .filter(|r| r.state == ImageState::Available && !r.in_flight)
            .filter(|r| r.reference.digest().is_none())
            .filter(|r| {
                periods
                    .get(&r.reference)
                    .is_some_and(|p| r.resolved.is_none_or(|at| at + *p <= now))
            })
            .map(|r| r.reference.clone())
            .collect()
    }

    /// The earliest instant an image becomes due to be resolved again.
    pub fn next_refresh(&self, periods: &HashMap<ImageReference, Duration>) -> Option<Instant> {
        self.records
            .values()
            .filter(|r| r.state == ImageState::Available && !r.in_flight)
            .filter(|r| r.reference.digest().is_none())
            .filter_map(|r| Some(r.resolved? + *periods.get(&r.reference)?))
            .min()
    }

    /// Records a refresh: the tag was resolved again (`held` is what the runtime holds now),
    /// or could not be (`held` is `None`; the image stays as it was, and is tried again after
    /// its period). Returns whether the digest moved.
    pub fn refreshed(&mut self, reference: &ImageReference, held: Option<Held>) -> bool {
        let ended = self.end();
        let Some(record) = self.records.get_mut(&reference.to_string()) else {
            return false;
        };
        record.ended_at = ended;
        record.in_flight = false;
        record.resolved = Some(Instant::now());
        let Some(held) = held else {
            return false;
        };
        let moved = record
            .held
            .as_ref()
            .is_some_and(|h| h.digest != held.digest);
        if moved {
            record.pulls += 1;
        }
        record.held = Some(held);
        moved
    }

    /// Records a pull that failed; `jitter` in `[0, 1)` spreads the backoff.
    pub fn failed(&mut self, reference: &ImageReference, error: String, now: Instant, jitter: f64) {
        let policy = self.policy;
        if let Some(record) = self.records.get_mut(&reference.to_string()) {
            record.in_flight = false;
            record.attempts += 1;
            record.last_error = Some(error);
            if record.attempts >= policy.max_attempts {
                record.not_before = Some(now + policy.max);
                record.set_state(ImageState::Failed);
            } else {
                record.not_before = Some(now + policy.delay(record.attempts, jitter));
            }
        }
    }

    /// Records a pull that was interrupted (the runtime went away): tried again at `at`,
    /// without counting an attempt.
    pub fn retry_later(&mut self, reference: &ImageReference, at: Instant) {
        if let Some(record) = self.records.get_mut(&reference.to_string()) {
            record.in_flight = false;
            record.not_before = Some(at);
        }
    }

    pub fn get(&self, reference: &ImageReference) -> Option<&ImageRecord> {
        self.records.get(&reference.to_string())
    }

    pub fn records(&self) -> impl Iterator<Item = &ImageRecord> {
        self.records.values()
    }

    pub fn counts(&self) -> Counts {
        let mut counts = Counts {
            wanted: self.records.len(),
            ..Counts::default()
        };
        for record in self.records.values() {
            match record.state {
                ImageState::Available => counts.available += 1,
                ImageState::Pulling => counts.pulling += 1,
                ImageState::Failed => counts.failed += 1,
                ImageState::Paused => counts.paused += 1,
            }
        }
        counts
    }

    /// No pull is under way or due: every wanted image is available, failed after all its
    /// attempts, or paused.
    pub fn settled(&self) -> bool {
        self.records.values().all(|r| {
            !r.in_flight
                && matches!(
                    r.state,
                    ImageState::Available | ImageState::Failed | ImageState::Paused
                )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> ImageReference {
        ImageReference::parse(text).expect("valid reference")
    }

    fn tracker(images: &[&str]) -> Tracker {
        let mut tracker = Tracker::new(RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_attempts: 3,
        });
        tracker.set_wanted(
            images
                .iter()
                .map(|i| (reference(i), Arc::new(Keyring::new()))),
        );
        tracker
    }

    fn runtime_image(id: &str, tags: &[&str], digests: &[&str]) -> RuntimeImage {
        RuntimeImage {
            id: id.to_string(),
            repo_tags: tags.iter().map(ToString::to_string).collect(),
            repo_digests: digests.iter().map(ToString::to_string).collect(),
            size: 1234,
        }
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_the_cap() {
        let policy = RetryPolicy {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
            max_attempts: 5,
        };
        assert_eq!(policy.delay(1, 0.5), Duration::from_secs(2));
        assert_eq!(policy.delay(2, 0.5), Duration::from_secs(4));
        assert_eq!(policy.delay(3, 0.0), Duration::from_secs_f64(6.4));
        assert_eq!(policy.delay(3, 1.0), Duration::from_secs_f64(9.6));
        assert_eq!(policy.delay(10, 0.5), Duration::from_secs(60));
        assert_eq!(
            policy.delay(10, 1.0),
            Duration::from_secs(60),
            "jitter never passes the cap"
        );
        assert_eq!(policy.delay(u32::MAX, 0.5), Duration::from_secs(60));
    }

    #[test]
    fn present_images_by_tag_or_digest_are_not_pulled() {
        let mut tracker = tracker(&[
            "nginx:1.27",
            &format!("registry.example.com/app@{DIGEST}"),
            "redis:7",
        ]);
        let inventory = Inventory::new(vec![
            runtime_image(
                "sha256:aaa",
                &["docker.io/library/nginx:1.27"],
                &[&format!("docker.io/library/nginx@{DIGEST}")],
            ),
            runtime_image(
                "sha256:bbb",
                &[],
                &[&format!("registry.example.com/app@{DIGEST}")],
            ),
        ]);
        let now = Instant::now();
        let observed = tracker.observe(&inventory, now, false);
        assert!(observed.changed);
        assert_eq!(tracker.due(now), vec![reference("redis:7")]);
        let nginx = tracker.get(&reference("nginx")).map(|_| ()).is_none();
        assert!(nginx, "nginx:latest is not wanted");
        let nginx = tracker.get(&reference("nginx:1.27")).expect("wanted");
        assert_eq!(nginx.state, ImageState::Available);
        let held = nginx.held.as_ref().expect("held");
        assert_eq!(held.digest.as_deref(), Some(DIGEST));
        assert_eq!((held.image_id.as_str(), held.size), ("sha256:aaa", 1234));
        assert!(
            !tracker.observe(&inventory, now, false).changed,
            "nothing new"
        );
    }

    #[test]
    fn failures_back_off_then_fail_and_are_retried_after_the_cap() {
        let mut tracker = tracker(&["ghcr.io/x/missing:1"]);
        let image = reference("ghcr.io/x/missing:1");
        let t0 = Instant::now();
        assert!(tracker.start(&image));
        assert!(
            !tracker.start(&image),
            "never two pulls of one image at once"
        );
        assert!(tracker.due(t0).is_empty());
        tracker.failed(&image, "not found".into(), t0, 0.5);
        assert_eq!(
            tracker.get(&image).map(|r| r.state),
            Some(ImageState::Pulling)
        );
        assert!(tracker.due(t0).is_empty(), "backing off");
        assert_eq!(tracker.next_due(), Some(t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(tracker.due(t1), vec![image.clone()]);
        tracker.start(&image);
        tracker.failed(&image, "not found".into(), t1, 0.5);
        assert_eq!(tracker.next_due(), Some(t1 + Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        tracker.start(&image);
        assert!(!tracker.settled(), "a pull is under way");
        tracker.failed(&image, "not found: ghcr.io/x/missing:1".into(), t2, 0.5);
        let record = tracker.get(&image).expect("wanted");
        assert_eq!(record.state, ImageState::Failed);
        assert_eq!(record.attempts, 3);
        assert_eq!(
            record.last_error.as_deref(),
            Some("not found: ghcr.io/x/missing:1")
        );
        assert!(tracker.settled());
        assert_eq!(
            tracker.next_due(),
            Some(t2 + Duration::from_secs(60)),
            "retried after the cap"
        );
        assert_eq!(tracker.counts().failed, 1);

        tracker.start(&image);
        tracker.succeeded(&image, None);
        let record = tracker.get(&image).expect("wanted");
        assert_eq!(
            (record.state, record.attempts, record.last_error.clone()),
            (ImageState::Available, 0, None)
        );
    }

    #[test]
    fn a_listing_begun_before_a_pull_or_refresh_ended_does_not_judge_it() {
        let mut tracker = tracker(&["nginx:1.27"]);
        let image = reference("nginx:1.27");
        let now = Instant::now();
        let empty = Inventory::new(Vec::new());
        tracker.observe(&empty, now, false);
        assert!(tracker.start(&image));
        // The engine lists the runtime while the pull is under way; the pull ends before
        // the listing is read.
        let listing = tracker.listing();
        let held = |digest: &str| Held {
            image_id: format!("sha256:{digest}"),
            digest: Some(format!("sha256:{}", digest.repeat(64))),
            size: 1,
        };
        tracker.succeeded(&image, Some(held("a")));
        let observed = tracker.observe_listing(&empty, listing, now, false);
        assert_eq!(observed.vanished, 0, "the listing predates the pull");
        let record = tracker.get(&image).expect("wanted");
        assert_eq!(record.state, ImageState::Available);
        assert_eq!(record.held, Some(held("a")));
        // A listing begun after the pull ended does judge it.
        assert_eq!(tracker.observe(&empty, now, false).vanished, 1);

        // The same for a refresh: a listing from before it ended still shows the old digest.
        let mut tracker = self::tracker(&["nginx:1.27"]);
        let old = Inventory::new(vec![runtime_image(
            "sha256:a",
            &["docker.io/library/nginx:1.27"],
            &[&format!(
                "docker.io/library/nginx@sha256:{}",
                "a".repeat(64)
            )],
        )]);
        tracker.observe(&old, now, false);
        assert!(tracker.start(&image));
        let listing = tracker.listing();
        assert!(tracker.refreshed(&image, Some(held("b"))), "moved");
        tracker.observe_listing(&old, listing, now, false);
        assert_eq!(
            tracker.get(&image).and_then(|r| r.held.clone()),
            Some(held("b")),
            "the refreshed digest stays"
        );
    }

    #[test]
    fn a_vanished_image_is_pulled_again_after_a_backoff_that_grows() {
        let mut tracker = tracker(&["nginx:1.27"]);
        let image = reference("nginx:1.27");
        let present = Inventory::new(vec![runtime_image(
            "sha256:a",
            &["docker.io/library/nginx:1.27"],
            &[],
        )]);
        let gone = Inventory::default();
        let t0 = Instant::now();
        tracker.observe(&present, t0, false);
        let observed = tracker.observe(&gone, t0, false);
        assert_eq!(observed.vanished, 1);
        assert!(tracker.due(t0).is_empty(), "not re-pulled at once");
        assert_eq!(tracker.next_due(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            tracker.observe(&gone, t0, false).vanished,
            0,
            "counted once"
        );
        tracker.observe(&present, t0, false);
        tracker.observe(&gone, t0, false);
        assert_eq!(tracker.get(&image).map(|r| r.vanished), Some(2));
        assert_eq!(
            tracker.next_due(),
            Some(t0 + Duration::from_secs(2)),
            "longer the second time"
        );
    }

    #[test]
    fn pressure_pauses_pending_pulls_and_releases_them() {
        let mut tracker = tracker(&["nginx:1.27", "redis:7"]);
        let inventory = Inventory::new(vec![runtime_image(
            "sha256:a",
            &["docker.io/library/nginx:1.27"],
            &[],
        )]);
        let now = Instant::now();
        tracker.observe(&inventory, now, true);
        assert_eq!(
            tracker.counts(),
            Counts {
                wanted: 2,
                available: 1,
                paused: 1,
                ..Counts::default()
            }
        );
        assert!(tracker.due(now).is_empty());
        tracker.observe(&inventory, now, false);
        assert_eq!(tracker.due(now), vec![reference("redis:7")]);
    }

    #[test]
    fn images_no_longer_wanted_are_returned_and_kept_ones_keep_their_state() {
        let mut tracker = tracker(&["nginx:1.27", "redis:7"]);
        let inventory = Inventory::new(vec![runtime_image(
            "sha256:a",
            &["docker.io/library/nginx:1.27"],
            &[],
        )]);
        tracker.observe(&inventory, Instant::now(), false);
        let removed = tracker.set_wanted([(reference("nginx:1.27"), Arc::new(Keyring::new()))]);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].reference, reference("redis:7"));
        assert_eq!(
            tracker.get(&reference("nginx:1.27")).map(|r| r.state),
            Some(ImageState::Available)
        );
    }
}
