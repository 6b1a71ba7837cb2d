//! `coral mirror` beside `skopeo copy` of the same images between the same real registries, in
//! one run: 20 small images, then one image with a 256 MiB layer (random bytes, so that gzip
//! leaves it that size). Prints each wall time, the ratio coral/skopeo, and coral's peak
//! resident memory for the small images and for the large one (memory must not grow with a
//! layer's size).
//!
//! `cargo bench --bench mirror` (or `just bench`). Each round copies into fresh registries, so
//! that nothing is skipped; two rounds, alternating which tool goes first, and the best of each.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark stops on setup failures

#[path = "../tests/support/runtime.rs"]
#[allow(dead_code)]
mod runtime;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runtime::Registry;

/// The mirror reference of a loopback source reference, by the mapping rule.
fn mirrored(to: &Registry, source: &str) -> String {
    let (host, rest) = source.split_once('/').unwrap();
    format!("{}/{}/{rest}", to.host(), host.replace(':', "_"))
}

fn skopeo(images: &[String], to: &Registry) -> Duration {
    let started = Instant::now();
    for image in images {
        let status = Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--all",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
            ])
            .arg(format!("docker://{image}"))
            .arg(format!("docker://{}", mirrored(to, image)))
            .status()
            .unwrap();
        assert!(status.success(), "skopeo copy {image}");
    }
    started.elapsed()
}

/// `coral mirror` of `images`: its wall time and peak resident memory (MiB).
fn coral(images: &[String], to: &Registry) -> (Duration, f64) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("set.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: coral.dev/v1alpha1\nkind: ImageSet\nmetadata: {{name: bench, namespace: default}}\nspec:\n  images: {images:?}\n"
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coral"))
        .args(["mirror", "-f"])
        .arg(&file)
        .args(["--to", &to.host()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak_kib = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = text.lines().find_map(|line| {
                line.strip_prefix("VmHWM:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            }) {
                peak_kib = peak_kib.max(kib);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = started.elapsed();
    assert!(status.success(), "coral mirror failed");
    (took, peak_kib as f64 / 1024.0)
}

fn main() {
    // `cargo test --all-targets` runs this file too, without `--bench`: then a short round of
    // smaller images only checks that it works.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let (small_images, large_layer, rounds) = if benchmarking {
        (20, 256 << 20, 2)
    } else {
        println!(
            "check run (no --bench): 3 small images, a 4 MiB layer, one round; not benchmark figures"
        );
        (3, 4 << 20, 1)
    };
    let source = Registry::start(None);
    let small: Vec<String> = (0..small_images)
        .map(|i| source.push(&format!("small/app{i}"), "1.0", &format!("content {i}")))
        .collect();
    let mut layer = vec![0u8; large_layer];
    let mut rng = fastrand::Rng::with_seed(7);
    rng.fill(&mut layer);
    let large = vec![source.push_bytes("large/app", "1.0", &layer)];
    drop(layer);

    for (what, images) in [
        (format!("{small_images} small images"), &small),
        (
            format!("one image with a {} MiB layer", large_layer >> 20),
            &large,
        ),
    ] {
        let mut best_skopeo = Duration::MAX;
        let mut best_coral = Duration::MAX;
        let mut peak: f64 = 0.0;
        for round in 0..rounds {
            let for_skopeo = Registry::start(None);
            let for_coral = Registry::start(None);
            let mut run_coral = || {
                let (took, rss) = coral(images, &for_coral);
                best_coral = best_coral.min(took);
                peak = peak.max(rss);
            };
            if round % 2 == 0 {
                best_skopeo = best_skopeo.min(skopeo(images, &for_skopeo));
                run_coral();
            } else {
                run_coral();
                best_skopeo = best_skopeo.min(skopeo(images, &for_skopeo));
            }
        }
        println!(
            "{what}: coral mirror {:.2} s, skopeo copy {:.2} s (baseline), ratio {:.2}; coral peak RSS {peak:.1} MiB",
            best_coral.as_secs_f64(),
            best_skopeo.as_secs_f64(),
            best_coral.as_secs_f64() / best_skopeo.as_secs_f64()
        );
    }
}
