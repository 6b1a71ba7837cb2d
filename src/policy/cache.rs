//! Decisions already made with one snapshot, by the request they answered.
//!
//! A decision depends on the request, the namespace's labels, `data` and the policies. A cache
//! belongs to one [`super::Snapshot`] (namespaces, data and policies fixed), so its key is the
//! request alone: every field the policies see, serialized, except `uid`, which names the
//! request and not what is asked (a Deployment's ReplicaSets and their Pods, a retried or
//! reinvoked request, repeat the rest). A policy set whose source mentions `uid` keeps it in
//! the key; one that calls a builtin whose answer changes from call to call (time, random
//! numbers, HTTP) is not cached at all.
//!
//! Memory is bounded: entries are counted by their size and kept in two generations of half the
//! budget each; when the current one is full, the previous one is dropped. A hit in the
//! previous generation moves the entry to the current one, so what keeps being asked stays.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Decision, PolicyRequest, PolicySet};

/// Builtins whose answer may change between two evaluations of the same input.
const VOLATILE_BUILTINS: [&str; 6] = [
    "time.now_ns",
    "rand.intn",
    "uuid.rfc4122",
    "http.send",
    "opa.runtime",
    "net.lookup_ip_addr",
];

/// Bytes an entry costs beyond its key and strings (maps, pointers, the decision's vectors).
const ENTRY_OVERHEAD: usize = 160;

/// What part of a request keys a decision, given what the policies read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKeying {
    /// Every field but `uid`.
    WithoutUid,
    /// Every field: the policies mention `uid`.
    WithUid,
    /// No caching: the policies call a builtin whose answer changes between calls.
    Off,
}

impl CacheKeying {
    /// How decisions of a policy set may be cached, from its sources.
    pub fn of(set: &PolicySet) -> Self {
        let sources = || set.files.iter().map(|file| file.source.as_str());
        if sources().any(|source| VOLATILE_BUILTINS.iter().any(|b| source.contains(b))) {
            Self::Off
        } else if sources().any(|source| source.contains("uid")) {
            Self::WithUid
        } else {
            Self::WithoutUid
        }
    }
}

/// A bounded cache of decisions (see the module documentation).
#[derive(Debug)]
pub struct DecisionCache {
    keying: CacheKeying,
    /// Bytes of one generation.
    generation_bytes: usize,
    generations: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    current: HashMap<Box<[u8]>, Arc<Decision>>,
    current_bytes: usize,
    previous: HashMap<Box<[u8]>, Arc<Decision>>,
}

impl DecisionCache {
    /// A cache of at most `budget_bytes`; 0 caches nothing.
    pub fn new(budget_bytes: usize, keying: CacheKeying) -> Self {
        let keying = if budget_bytes == 0 {
            CacheKeying::Off
        } else {
            keying
        };
        Self {
            keying,
            generation_bytes: budget_bytes / 2,
            generations: Mutex::default(),
        }
    }

    /// The key of a request: `None` when nothing is cached. The request is given back as it
    /// came.
    pub fn key(&self, request: &mut PolicyRequest) -> Option<Vec<u8>> {
        match self.keying {
            CacheKeying::Off => None,
            CacheKeying::WithUid => serde_json::to_vec(request).ok(),
            CacheKeying::WithoutUid => {
                let uid = std::mem::take(&mut request.uid);
                let key = serde_json::to_vec(request).ok();
                request.uid = uid;
                key
            }
        }
    }

    /// The decision made for this key, if it is still kept.
    pub fn get(&self, key: &[u8]) -> Option<Arc<Decision>> {
        let mut generations = self.lock();
        if let Some(decision) = generations.current.get(key) {
            return Some(decision.clone());
        }
        let (key, decision) = generations.previous.remove_entry(key)?;
        let cost = cost(&key, &decision);
        generations.insert(key, decision.clone(), cost, self.generation_bytes);
        Some(decision)
    }

    /// Keeps a decision (without its patched object, which answers do not need).
    pub fn insert(&self, key: Vec<u8>, decision: &Decision) {
        let decision = Arc::new(Decision {
            object: serde_json::Value::Null,
            ..decision.clone()
        });
        let key = key.into_boxed_slice();
        let cost = cost(&key, &decision);
        if cost > self.generation_bytes {
            return;
        }
        self.lock()
            .insert(key, decision, cost, self.generation_bytes);
    }

    /// Entries kept and their bytes.
    #[cfg(test)]
    fn usage(&self) -> (usize, usize) {
        let generations = self.lock();
        let bytes: usize = generations
            .previous
            .iter()
            .map(|(key, decision)| cost(key, decision))
            .sum();
        (
            generations.current.len() + generations.previous.len(),
            generations.current_bytes + bytes,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // A panic while holding the lock leaves maps that are still consistent.
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Generations {
    fn insert(&mut self, key: Box<[u8]>, decision: Arc<Decision>, cost: usize, limit: usize) {
        if self.current_bytes + cost > limit {
            self.previous = std::mem::take(&mut self.current);
            self.current_bytes = 0;
        }
        if self.current.insert(key, decision).is_none() {
            self.current_bytes += cost;
        }
    }
}

/// What an entry costs in memory, roughly.
fn cost(key: &[u8], decision: &Decision) -> usize {
    let strings: usize = decision
        .warnings
        .iter()
        .chain(&decision.denials)
        .map(|s| s.len() + 24)
        .sum();
    let patch: usize = decision
        .patch
        .0
        .iter()
        .map(|op| serde_json::to_string(op).map_or(256, |s| s.len() * 2))
        .sum();
    key.len() + strings + patch + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use json_patch::Patch;

    use crate::policy::PolicyFile;

    fn request(uid: &str, image: &str) -> PolicyRequest {
        let mut request = PolicyRequest::create(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                   "spec": {"containers": [{"name": "c", "image": image}]}}),
            "default",
        )
        .expect("pod");
        request.uid = uid.to_string();
        request
    }

    fn decision(warning: &str) -> Decision {
        Decision {
            allowed: true,
            patch: Patch(Vec::new()),
            warnings: vec![warning.to_string()],
            denials: Vec::new(),
            object: json!({"kept": "no"}),
        }
    }

    fn set(source: &str) -> PolicySet {
        PolicySet {
            files: vec![PolicyFile {
                name: "p.rego".into(),
                source: source.into(),
            }],
            ..PolicySet::embedded()
        }
    }

    #[test]
    fn the_key_leaves_out_the_uid_unless_the_policies_mention_it() {
        let cache = DecisionCache::new(1 << 20, CacheKeying::WithoutUid);
        let key = cache.key(&mut request("a", "nginx")).expect("cached");
        assert_eq!(cache.key(&mut request("b", "nginx")), Some(key.clone()));
        assert_ne!(cache.key(&mut request("a", "redis")), Some(key.clone()));
        cache.insert(key.clone(), &decision("w"));
        let hit = cache.get(&key).expect("hit");
        assert_eq!(hit.warnings, ["w"]);
        assert_eq!(hit.object, serde_json::Value::Null);

        let with_uid = DecisionCache::new(1 << 20, CacheKeying::WithUid);
        assert_ne!(
            with_uid.key(&mut request("a", "nginx")),
            with_uid.key(&mut request("b", "nginx"))
        );
        assert!(
            DecisionCache::new(0, CacheKeying::WithoutUid)
                .key(&mut request("a", "x"))
                .is_none()
        );

        assert_eq!(
            CacheKeying::of(&PolicySet::embedded()),
            CacheKeying::WithoutUid
        );
        assert_eq!(
            CacheKeying::of(&set(
                "package coral.mutate\nwarn contains input.uid if true\n"
            )),
            CacheKeying::WithUid
        );
        assert_eq!(
            CacheKeying::of(&set(
                "package coral.mutate\nwarn contains sprintf(\"%d\", [time.now_ns()]) if true\n"
            )),
            CacheKeying::Off
        );
    }

    #[test]
    fn memory_stays_within_the_budget_and_what_is_asked_again_stays() {
        let budget = 64 * 1024;
        let cache = DecisionCache::new(budget, CacheKeying::WithoutUid);
        let first = cache.key(&mut request("u", "image-0")).expect("key");
        cache.insert(first.clone(), &decision("first"));
        for i in 1..2_000 {
            let key = cache
                .key(&mut request("u", &format!("image-{i}")))
                .expect("key");
            cache.insert(key, &decision("w"));
            // Asked again now and then: it survives every generation change.
            if i % 50 == 0 {
                assert!(cache.get(&first).is_some(), "entry lost at {i}");
            }
            let (_, bytes) = cache.usage();
            assert!(bytes <= budget, "{bytes} bytes kept");
        }
        let (entries, _) = cache.usage();
        assert!(entries > 50 && entries < 2_000, "{entries} entries");
    }
}
