//! Replays every committed fuzz input through its target on stable: the seed corpora
//! (`fuzz/corpus/TARGET`) and every input that once broke a target (`fuzz/regressions/TARGET`),
//! so a crash once found stays fixed without the fuzzer. `scripts/fuzz.sh` runs the targets
//! under libFuzzer.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

use std::path::Path;

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("fuzz target {target} fails on {}", path.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no committed inputs for {target}");
}

#[test]
fn image_reference() {
    replay("image_reference", targets::image_reference);
}

#[test]
fn admission_review() {
    replay("admission_review", targets::admission_review);
}

#[test]
fn rails() {
    replay("rails", targets::rails);
}

#[test]
fn state_file() {
    replay("state_file", targets::state_file);
}

#[test]
fn policy_configmap() {
    replay("policy_configmap", targets::policy_configmap);
}

#[test]
fn pull_secrets() {
    replay("pull_secrets", targets::pull_secrets);
}

#[test]
fn cri_responses() {
    replay("cri_responses", targets::cri_responses);
}
