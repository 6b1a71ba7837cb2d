//! Retention of images no ImageSet wants any more: which of them the agent removes, and when.
//! Pure; the engine does the runtime calls.
//!
//! An image the agent held for an ImageSet becomes *unwanted* when the last ImageSet wanting
//! it lets go (an image whose label live workloads still require stays wanted: the controller
//! keeps it in the ImageSet's `status.retiring`). It is removed once its grace period has
//! passed, or sooner while the image filesystem uses more than the high watermark: then the
//! least recently wanted go first, until the filesystem is back under the low watermark.
//! Images a container uses, or whose content a wanted image shares, are never removed.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::{ImageRemoval, UnwantedImage};
use crate::image::ImageReference;

/// Removals kept in the NodeImage.
pub const MAX_REMOVALS: usize = 20;

/// When unwanted images go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// How long an unwanted image stays; `None`: until the high watermark makes room.
    pub grace: Option<Duration>,
    /// Above this many bytes used on the image filesystem, unwanted images go before their
    /// grace period ends...
    pub high_watermark: Option<u64>,
    /// ...until the filesystem uses at most this many.
    pub low_watermark: Option<u64>,
}

impl RetentionPolicy {
    /// Nothing is ever removed.
    pub const KEEP: Self = Self {
        grace: None,
        high_watermark: None,
        low_watermark: None,
    };

    pub fn removes_anything(&self) -> bool {
        self.grace.is_some() || self.high_watermark.is_some()
    }
}

/// Why an image was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalReason {
    /// Unwanted for its grace period.
    Grace,
    /// The image filesystem was over its high watermark.
    Watermark,
}

impl RemovalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grace => "grace",
            Self::Watermark => "watermark",
        }
    }
}

/// One unwanted image still on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwanted {
    pub reference: ImageReference,
    /// When the last ImageSet stopped wanting it.
    pub since: SystemTime,
    pub size: u64,
    pub digest: Option<String>,
    /// Why it stayed past its grace period, when it did.
    pub kept: Option<String>,
}

/// What to remove now, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Past their grace period.
    pub expired: Vec<ImageReference>,
    /// Still in their grace period, least recently wanted first: removed in this order while
    /// `to_free` bytes are still to be freed.
    pub pressure: Vec<ImageReference>,
    /// Bytes to free to get down to the low watermark, after the expired ones are gone.
    pub to_free: u64,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.expired.is_empty() && (self.pressure.is_empty() || self.to_free == 0)
    }
}

/// The unwanted images and the latest removals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    unwanted: BTreeMap<String, Unwanted>,
    removals: VecDeque<ImageRemoval>,
}

fn time(at: SystemTime) -> Time {
    Time(Timestamp::try_from(at).unwrap_or(Timestamp::UNIX_EPOCH))
}

impl Retention {
    /// An image held for an ImageSet is no longer wanted.
    pub fn left(
        &mut self,
        reference: ImageReference,
        size: u64,
        digest: Option<String>,
        now: SystemTime,
    ) {
        self.unwanted
            .entry(reference.to_string())
            .or_insert(Unwanted {
                reference,
                since: now,
                size,
                digest,
                kept: None,
            });
    }

    /// An image is wanted again: it is no longer a candidate.
    pub fn wanted(&mut self, reference: &ImageReference) {
        self.unwanted.remove(&reference.to_string());
    }

    /// Takes up what a NodeImage recorded (the agent restarted): the images keep the time they
    /// became unwanted, so a restart does not start their grace period again.
    pub fn restore(&mut self, unwanted: &[UnwantedImage], removals: &[ImageRemoval]) {
        for image in unwanted {
            let Ok(reference) = ImageReference::parse(&image.image) else {
                continue;
            };
            let since = SystemTime::from(image.since.0);
            self.unwanted
                .entry(reference.to_string())
                .or_insert(Unwanted {
                    reference,
                    since,
                    size: image
                        .size_bytes
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(0),
                    digest: None,
                    kept: image.kept.clone(),
                });
        }
        if self.removals.is_empty() {
            self.removals = removals.iter().take(MAX_REMOVALS).cloned().collect();
        }
    }

    /// Forgets an image that is gone from the runtime, or removed by the agent.
    pub fn forget(&mut self, reference: &ImageReference) -> Option<Unwanted> {
        self.unwanted.remove(&reference.to_string())
    }

    pub fn set_kept(&mut self, reference: &ImageReference, why: Option<String>) {
        if let Some(entry) = self.unwanted.get_mut(&reference.to_string()) {
            entry.kept = why;
        }
    }

    /// Records a removal, newest first.
    pub fn removed(&mut self, image: &Unwanted, reason: RemovalReason, now: SystemTime) {
        self.removals.push_front(ImageRemoval {
            image: image.reference.to_string(),
            digest: image.digest.clone(),
            size_bytes: i64::try_from(image.size).ok(),
            reason: reason.as_str().to_string(),
            time: time(now),
        });
        self.removals.truncate(MAX_REMOVALS);
    }

    pub fn unwanted(&self) -> impl Iterator<Item = &Unwanted> {
        self.unwanted.values()
    }

    pub fn get(&self, reference: &ImageReference) -> Option<&Unwanted> {
        self.unwanted.get(&reference.to_string())
    }

    pub fn is_empty(&self) -> bool {
        self.unwanted.is_empty()
    }

    /// Bytes the unwanted images take, as the runtime reports their sizes.
    pub fn bytes(&self) -> u64 {
        self.unwanted.values().map(|u| u.size).sum()
    }

    /// What the NodeImage records of the unwanted images.
    pub fn unwanted_status(&self) -> Vec<UnwantedImage> {
        self.unwanted
            .values()
            .map(|u| UnwantedImage {
                image: u.reference.to_string(),
                since: time(u.since),
                digest: u.digest.clone(),
                size_bytes: i64::try_from(u.size).ok(),
                kept: u.kept.clone(),
            })
            .collect()
    }

    pub fn removals(&self) -> Vec<ImageRemoval> {
        self.removals.iter().cloned().collect()
    }

    /// What to remove now, with the image filesystem using `used` bytes (when measured).
    pub fn plan(&self, policy: &RetentionPolicy, now: SystemTime, used: Option<u64>) -> Plan {
        let mut plan = Plan::default();
        let mut rest: Vec<&Unwanted> = Vec::new();
        let mut freed = 0u64;
        for entry in self.unwanted.values() {
            let age = now.duration_since(entry.since).unwrap_or_default();
            if policy.grace.is_some_and(|grace| age >= grace) {
                plan.expired.push(entry.reference.clone());
                freed = freed.saturating_add(entry.size);
            } else {
                rest.push(entry);
            }
        }
        if let (Some(high), Some(used)) = (policy.high_watermark, used) {
            let low = policy.low_watermark.unwrap_or(high).min(high);
            let after = used.saturating_sub(freed);
            if used > high && after > low {
                plan.to_free = after - low;
                rest.sort_by_key(|u| (u.since, u.reference.to_string()));
                plan.pressure = rest.into_iter().map(|u| u.reference.clone()).collect();
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> ImageReference {
        ImageReference::parse(text).expect("valid")
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds)
    }

    fn policy(grace: u64, high: Option<u64>, low: Option<u64>) -> RetentionPolicy {
        RetentionPolicy {
            grace: Some(Duration::from_secs(grace)),
            high_watermark: high,
            low_watermark: low,
        }
    }

    #[test]
    fn unwanted_images_go_after_their_grace_period_and_not_before() {
        let mut retention = Retention::default();
        retention.left(reference("a:1"), 10, None, at(0));
        retention.left(reference("b:1"), 10, None, at(50));
        let p = policy(100, None, None);
        assert!(retention.plan(&p, at(99), Some(1 << 40)).is_empty());
        assert_eq!(
            retention.plan(&p, at(100), None).expired,
            vec![reference("a:1")]
        );
        assert_eq!(retention.plan(&p, at(150), None).expired.len(), 2);
        // Wanted again: no longer a candidate; unwanted again later: a new grace period.
        retention.wanted(&reference("a:1"));
        retention.left(reference("a:1"), 10, None, at(140));
        assert_eq!(
            retention.plan(&p, at(150), None).expired,
            vec![reference("b:1")]
        );
        // Leaving twice keeps the first time.
        retention.left(reference("b:1"), 10, None, at(149));
        assert_eq!(retention.get(&reference("b:1")).unwrap().since, at(50));
        assert!(
            retention
                .plan(&RetentionPolicy::KEEP, at(10_000), Some(1 << 40))
                .is_empty()
        );
    }

    #[test]
    fn over_the_high_watermark_the_least_recently_wanted_go_first_down_to_the_low_one() {
        let mut retention = Retention::default();
        retention.left(reference("new:1"), 30, None, at(30));
        retention.left(reference("old:1"), 30, None, at(10));
        retention.left(reference("mid:1"), 30, None, at(20));
        retention.left(reference("expired:1"), 25, None, at(0));
        let p = policy(100, Some(100), Some(60));
        // Under the high watermark: only what expired.
        let plan = retention.plan(&p, at(105), Some(100));
        assert_eq!(plan.expired, vec![reference("expired:1")]);
        assert!(plan.pressure.is_empty() && plan.to_free == 0);
        // Over it: the expired image frees 25, 35 more to get to 60.
        let plan = retention.plan(&p, at(105), Some(120));
        assert_eq!(plan.to_free, 35);
        assert_eq!(
            plan.pressure,
            vec![reference("old:1"), reference("mid:1"), reference("new:1")]
        );
        // Just over the high watermark: down to the low one all the same.
        let plan = retention.plan(&p, at(105), Some(101));
        assert_eq!(plan.to_free, 16);
        // The expired one is enough to get under the low watermark: no pressure removals.
        let mut small = Retention::default();
        small.left(reference("expired:1"), 50, None, at(0));
        small.left(reference("new:1"), 30, None, at(30));
        let plan = small.plan(&p, at(105), Some(101));
        assert_eq!(plan.expired, vec![reference("expired:1")]);
        assert_eq!(plan.to_free, 0);
        assert!(plan.pressure.is_empty());
        // A watermark without a grace period still makes room.
        let only_watermark = RetentionPolicy { grace: None, ..p };
        let plan = retention.plan(&only_watermark, at(1_000_000), Some(120));
        assert!(plan.expired.is_empty());
        assert_eq!(plan.to_free, 60);
        assert_eq!(plan.pressure[0], reference("expired:1"));
        // No measurement: no pressure.
        assert!(retention.plan(&only_watermark, at(105), None).is_empty());
    }

    #[test]
    fn a_restart_keeps_when_images_became_unwanted_and_the_latest_removals() {
        let mut retention = Retention::default();
        retention.left(reference("a:1"), 10, Some("sha256:a".into()), at(0));
        retention.left(reference("b:1"), 20, Some("sha256:b".into()), at(5));
        let gone = retention.forget(&reference("a:1")).unwrap();
        for _ in 0..MAX_REMOVALS + 3 {
            retention.removed(&gone, RemovalReason::Grace, at(7));
        }
        retention.set_kept(&reference("b:1"), Some("in use".into()));
        let unwanted = retention.unwanted_status();
        let removals = retention.removals();
        assert_eq!(removals.len(), MAX_REMOVALS);
        assert_eq!(removals[0].image, "docker.io/library/a:1");
        assert_eq!(removals[0].digest.as_deref(), Some("sha256:a"));
        assert_eq!(removals[0].reason, "grace");

        let mut restored = Retention::default();
        restored.restore(&unwanted, &removals);
        let b = restored.get(&reference("b:1")).unwrap();
        assert_eq!(
            (b.since, b.size, b.kept.as_deref()),
            (at(5), 20, Some("in use"))
        );
        assert_eq!(restored.removals(), removals);
        assert_eq!(restored.bytes(), 20);
    }
}
