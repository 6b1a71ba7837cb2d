use super::plan::*;
use crate::image::ImageReference;

fn target(text: &str) -> MirrorTarget {
    text.parse().expect("target")
}

fn mirrored(source: &str, to: &str) -> String {
    mirror_reference(&ImageReference::parse(source).expect("source"), &target(to))
        .expect("mapped")
        .to_string()
}

#[test]
fn the_mapping_rule_keeps_the_source_registry_and_path() {
    assert_eq!(
        mirrored("nginx:1.27", "mirror:5000"),
        "mirror:5000/docker.io/library/nginx:1.27"
    );
    assert_eq!(
        mirrored("ghcr.io/acme/app:1.0", "registry.example.com/coral"),
        "registry.example.com/coral/ghcr.io/acme/app:1.0"
    );
    let digest = format!("sha256:{}", "a".repeat(64));
    assert_eq!(
        mirrored(&format!("nginx:1.27@{digest}"), "127.0.0.1:5001"),
        format!("127.0.0.1:5001/docker.io/library/nginx:1.27@{digest}"),
        "a digest stays, so digest references keep working"
    );
    assert_eq!(
        mirrored(&format!("quay.io/a/b@{digest}"), "localhost:5000/"),
        format!("localhost:5000/quay.io/a/b@{digest}")
    );
}

#[test]
fn no_two_sources_meet_in_the_mirror() {
    // A port becomes _PORT, which no host name can contain.
    let sources = [
        "registry:5000/app:1",
        "registry-5000/app:1",
        "registry.5000.example/app:1",
        "Registry.Example.com/app:1",
        "registry.example.com/app:1",
        "localhost:5000/app:1",
        "localhost/app:1",
    ];
    let mapped: Vec<String> = sources.iter().map(|s| mirrored(s, "mirror:5000")).collect();
    assert_eq!(mapped[0], "mirror:5000/registry_5000/app:1");
    assert_eq!(mapped[3], mapped[4], "host names are case-insensitive");
    let mut distinct = mapped.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), mapped.len() - 1, "{mapped:?}");
}

#[test]
fn a_name_too_long_for_the_mirror_is_refused_with_both_names() {
    let long = format!("ghcr.io/{}/app:1", "a".repeat(240));
    let error = mirror_reference(
        &ImageReference::parse(&long).expect("source"),
        &target("registry.example.com/some/prefix"),
    )
    .expect_err("too long");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{long} cannot be mirrored: ")),
        "{message}"
    );
    assert!(message.contains("at most 255"), "{message}");
}

#[test]
fn a_target_must_start_with_a_registry_host() {
    for (text, says) in [
        ("mirror", "must be a registry host"),
        ("mirror/coral", "must be a registry host"),
        ("mirror:99999", "port must be between 1 and 65535"),
        ("mirror:5000/Coral", "must be lower case"),
    ] {
        let error = text.parse::<MirrorTarget>().expect_err(text).to_string();
        assert!(error.contains(says), "{text}: {error}");
    }
    assert_eq!(
        target("mirror.local/coral/").to_string(),
        "mirror.local/coral"
    );
    assert!(target("127.0.0.1:5000").is_loopback());
    assert!(target("localhost:5000").is_loopback());
    assert!(target("[::1]:5000").is_loopback());
    assert!(!target("registry.example.com").is_loopback());
}

#[test]
fn platforms_read_as_os_architecture_and_variant() {
    let platform: Platform = "linux/arm64/v8".parse().expect("platform");
    assert_eq!(platform.variant.as_deref(), Some("v8"));
    assert_eq!(platform.to_string(), "linux/arm64/v8");
    for bad in ["linux", "linux/", "linux/amd64/v1/x", "linux amd64"] {
        assert!(bad.parse::<Platform>().is_err(), "{bad}");
    }
}

fn index() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "1".repeat(64)), "size": 10,
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", "2".repeat(64)), "size": 11,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
        "annotations": {"org.opencontainers.image.ref.name": "1.0"}
    }))
    .expect("json")
}

#[test]
fn an_index_is_copied_whole_or_with_the_platforms_asked_for() {
    let manifest = Manifest::parse("app:1.0", None, index()).expect("index");
    assert_eq!(manifest.digest, sha256_digest(&index()));
    let all = manifest
        .select("app:1.0", &[])
        .expect("select")
        .expect("index");
    assert_eq!(all.children.len(), 2);
    assert!(all.index.is_none(), "the whole index is pushed as it is");

    let arm: Platform = "linux/arm64".parse().expect("platform");
    let kept = manifest
        .select("app:1.0", &[arm])
        .expect("select")
        .expect("index");
    assert_eq!(kept.children.len(), 1);
    assert_eq!(
        kept.children[0].digest,
        format!("sha256:{}", "2".repeat(64))
    );
    let filtered: serde_json::Value =
        serde_json::from_slice(&kept.index.expect("a new index")).expect("json");
    assert_eq!(filtered["manifests"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        filtered["annotations"]["org.opencontainers.image.ref.name"],
        "1.0"
    );

    let error = manifest
        .select("app:1.0", &["linux/s390x".parse().expect("platform")])
        .expect_err("missing");
    assert_eq!(
        error.to_string(),
        "app:1.0: the image index has no manifest for linux/s390x"
    );
}

#[test]
fn manifests_coral_cannot_copy_say_why() {
    let error = Manifest::parse("app:1", None, b"not json".to_vec()).expect_err("json");
    assert!(
        error
            .to_string()
            .starts_with("app:1: not a manifest Coral can copy ("),
        "{error}"
    );
    let schema1 = br#"{"schemaVersion": 1, "name": "app", "fsLayers": []}"#.to_vec();
    let error = Manifest::parse("app:1", None, schema1).expect_err("schema 1");
    assert!(
        error
            .to_string()
            .contains("neither an image index nor an image manifest"),
        "{error}"
    );
    let image = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": format!("sha256:{}", "c".repeat(64)), "size": 5},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": format!("sha256:{}", "d".repeat(64)), "size": 7}]
    }))
    .expect("json");
    let manifest = Manifest::parse("app:1", None, image).expect("image");
    assert_eq!(manifest.blobs().len(), 2, "its config and its layer");
}

fn blob(content: &[u8]) -> Descriptor {
    Descriptor {
        media_type: "application/octet-stream".to_string(),
        digest: sha256_digest(content),
        size: content.len() as u64,
        platform: None,
    }
}

fn through_verification(descriptor: &Descriptor, pieces: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
    use futures::StreamExt;
    let pieces: Vec<Result<bytes::Bytes, std::io::Error>> = pieces
        .iter()
        .map(|p| Ok(bytes::Bytes::copy_from_slice(p)))
        .collect();
    let stream = super::copy::verified(futures::stream::iter(pieces), descriptor);
    futures::executor::block_on(stream.collect::<Vec<_>>())
        .into_iter()
        .map(|r| r.map(|b| b.to_vec()).map_err(|e| e.to_string()))
        .collect()
}

#[test]
fn a_blob_is_checked_as_it_streams_and_a_bad_one_never_completes() {
    let good = blob(b"hello world");
    let passed = through_verification(&good, &[b"hello ", b"world"]);
    assert_eq!(passed, vec![Ok(b"hello ".to_vec()), Ok(b"world".to_vec())]);

    // The same size, other bytes: the last piece is replaced by the error.
    let passed = through_verification(&good, &[b"hello ", b"w0rld"]);
    assert_eq!(passed[0], Ok(b"hello ".to_vec()));
    let error = passed[1].clone().expect_err("withheld");
    assert!(
        error.starts_with("the source served 11 bytes with digest sha256:")
            && error.ends_with(&format!(
                "for a blob of 11 bytes with digest {}",
                good.digest
            )),
        "{error}"
    );
    // More bytes than the blob has.
    let passed = through_verification(&good, &[b"hello world!"]);
    assert!(passed[0].is_err(), "{passed:?}");
}

#[test]
fn uploads_authenticate_with_the_registry_token_or_the_credential() {
    use oci_client::secrets::RegistryAuth;
    let basic = RegistryAuth::Basic("coral".to_string(), "s3cret".to_string());
    assert_eq!(
        super::copy::authorization(&basic, None).as_deref(),
        Some("Basic Y29yYWw6czNjcmV0")
    );
    assert_eq!(
        super::copy::authorization(&basic, Some("t0ken".to_string())).as_deref(),
        Some("Bearer t0ken"),
        "a token the registry issued wins"
    );
    assert_eq!(
        super::copy::authorization(&RegistryAuth::Anonymous, None),
        None
    );
}

mod book {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use crate::api::{
        ImageSet, ImageSetImageStatus, ImageSetMirror, ImageSetSpec, ImageSetStatus, MirrorState,
        Registry, RegistrySpec, RegistryTls,
    };
    use crate::mirror::book::*;
    use crate::mirror::{Copied, MirrorError, MirrorTarget};

    const RECHECK: Duration = Duration::from_secs(600);

    fn set(images: &[&str], registry: &str, platforms: &[&str]) -> ImageSet {
        let mut set = ImageSet::new(
            "cache",
            ImageSetSpec {
                images: images.iter().map(|s| s.to_string()).collect(),
                mirror: Some(ImageSetMirror {
                    registry: registry.to_string(),
                    platforms: platforms.iter().map(|s| s.to_string()).collect(),
                }),
                ..ImageSetSpec::default()
            },
        );
        set.metadata.namespace = Some("team-a".into());
        set
    }

    fn targets(endpoint: &str) -> BTreeMap<String, Option<MirrorTarget>> {
        BTreeMap::from([("local".to_string(), Some(endpoint.parse().expect("target")))])
    }

    fn copied(want: &Wanted, digest: &str) -> Attempt {
        let target: MirrorTarget = "localhost:5000".parse().expect("target");
        Attempt::Copied(Box::new(Copied {
            source: want.source.clone(),
            mirror: crate::mirror::mirror_reference(&want.source, &target).expect("mapped"),
            source_digest: digest.to_string(),
            mirror_digest: digest.to_string(),
            already: false,
            blobs_copied: 2,
            blobs_skipped: 0,
            bytes_copied: 10,
            size_bytes: Some(100),
            took: Duration::from_millis(5),
        }))
    }

    fn wall_at(seconds: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + seconds).expect("time"))
    }

    fn system_at(seconds: u64) -> std::time::SystemTime {
        std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    #[test]
    fn a_copy_no_imageset_wants_retires_and_is_due_for_deletion_after_the_retention() {
        let both = wanted(&set(&["nginx:1.27", "redis:7"], "local", &[])).expect("wanted");
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        book.retire(&both, &wall_at(0));
        for want in book.due(&both, &targets("localhost:5000"), start) {
            book.finish(&want.key, &copied(&want, "sha256:1"), start, &wall(), 0.5);
        }
        assert_eq!(book.mirrored_bytes_in("local"), Some(200));
        // A copy of a digest several tags of one repository share: redis gets its own.
        let redis = both
            .iter()
            .find(|w| w.key.image.contains("redis"))
            .expect("redis");
        book.finish(&redis.key, &copied(redis, "sha256:2"), start, &wall(), 0.5);

        // redis leaves the set: retired as of now, forgotten by the book's entries.
        let nginx = wanted(&set(&["nginx:1.27"], "local", &[])).expect("wanted");
        book.retire(&nginx, &wall_at(10));
        assert!(
            book.due(&nginx, &targets("localhost:5000"), start)
                .is_empty()
        );
        let retiring = book.retiring_in("local");
        assert_eq!(retiring.len(), 1);
        assert_eq!(
            retiring[0].reference,
            "localhost:5000/docker.io/library/redis:7"
        );
        assert_eq!(retiring[0].digest, "sha256:2");
        assert_eq!(book.mirrored_in("local"), 1);
        assert_eq!(book.mirrored_bytes_in("local"), Some(100));

        let retention = Duration::from_secs(60);
        assert!(book.retired_due(retention, system_at(69)).is_empty());
        let due = book.retired_due(retention, system_at(70));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, "local");

        // Wanted again before it went: no longer retired.
        book.retire(&both, &wall_at(80));
        book.due(&both, &targets("localhost:5000"), start);
        assert!(book.retiring_in("local").is_empty());
        book.retire(&nginx, &wall_at(90));
        book.forget_retired("local", "localhost:5000/docker.io/library/redis:7");
        assert!(book.retiring_in("local").is_empty());

        // A restart takes up what the Registry's status recorded, with its time.
        let mut restarted = Book::new(RECHECK);
        restarted.seed_retired("local", &retiring);
        assert_eq!(restarted.retiring_in("local"), retiring);
        restarted.keep_retired_of(&BTreeSet::new());
        assert!(restarted.retiring_in("local").is_empty());
    }

    #[test]
    fn the_copies_of_a_set_being_deleted_retire_unless_another_set_holds_them() {
        let mut deleted = set(&["nginx:1.27", "redis:7"], "local", &[]);
        let mut other = set(&["nginx:1.27"], "local", &[]);
        other.metadata.name = Some("other".into());
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        let mut wanted_now: Vec<Wanted> = wanted(&deleted).expect("wanted");
        wanted_now.extend(wanted(&other).expect("wanted"));
        for want in book.due(&wanted_now, &targets("localhost:5000"), start) {
            book.finish(&want.key, &copied(&want, "sha256:1"), start, &wall(), 0.5);
        }
        deleted.metadata.deletion_timestamp = Some(wall());
        book.retire_set("team-a", "cache", &wall_at(0));
        // The deleted set wants nothing; the other still holds nginx's copy.
        let still: Vec<Wanted> = wanted(&deleted)
            .expect("wanted")
            .into_iter()
            .chain(wanted(&other).expect("wanted"))
            .collect();
        book.due(&still, &targets("localhost:5000"), start);
        let retiring: Vec<String> = book
            .retiring_in("local")
            .into_iter()
            .map(|c| c.reference)
            .collect();
        assert_eq!(retiring, ["localhost:5000/docker.io/library/redis:7"]);
    }

    #[test]
    fn a_retired_digest_another_wanted_tag_serves_is_not_deleted() {
        let both = wanted(&set(&["nginx:1.27", "nginx:1"], "local", &[])).expect("wanted");
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        for want in book.due(&both, &targets("localhost:5000"), start) {
            book.finish(&want.key, &copied(&want, "sha256:1"), start, &wall(), 0.5);
        }
        let one = wanted(&set(&["nginx:1"], "local", &[])).expect("wanted");
        book.retire(&one, &wall_at(0));
        book.due(&one, &targets("localhost:5000"), start);
        assert!(
            book.retired_due(Duration::ZERO, system_at(1)).is_empty(),
            "deleting sha256:1 would delete nginx:1 too"
        );
        assert!(
            book.retiring_in("local")[0]
                .kept
                .as_deref()
                .is_some_and(|k| k.contains("serves the same digest"))
        );
    }

    fn source_down() -> Attempt {
        Attempt::Failed(MirrorError::Registry {
            what: "reading the manifest of",
            reference: "docker.io/library/nginx:1.27".into(),
            message: "connection refused".into(),
            transient: true,
        })
    }

    fn wall() -> Time {
        Time(Timestamp::from_second(1_800_000_000).expect("time"))
    }

    #[test]
    fn only_sets_that_mirror_want_copies_once_per_image() {
        let wanted = wanted(&set(
            &["nginx:1.27", "docker.io/library/nginx:1.27", "bad ref"],
            "local",
            &[],
        ))
        .expect("wanted");
        assert_eq!(
            wanted.len(),
            1,
            "one copy per normalized image, none for a bad reference"
        );
        assert_eq!(wanted[0].key.image, "docker.io/library/nginx:1.27");
        let mut plain = set(&["nginx:1.27"], "local", &[]);
        plain.spec.mirror = None;
        assert!(
            super::super::book::wanted(&plain)
                .expect("wanted")
                .is_empty()
        );
        let error = super::super::book::wanted(&set(&["nginx"], "local", &["linux"]))
            .expect_err("bad platform");
        assert!(error.starts_with("spec.mirror.platforms: "), "{error}");
    }

    #[test]
    fn spec_refresh_sets_how_often_the_source_tag_is_checked() {
        let mut refreshing = set(&["nginx:1.27"], "local", &[]);
        refreshing.spec.refresh = Some("30s".into());
        let want = wanted(&refreshing).expect("wanted");
        assert_eq!(want[0].refresh, Some(Duration::from_secs(30)));
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        assert_eq!(book.due(&want, &targets("localhost:5000"), start).len(), 1);
        book.finish(
            &want[0].key,
            &copied(&want[0], "sha256:1"),
            start,
            &wall(),
            0.5,
        );
        let at = |s| start + Duration::from_secs(s);
        assert!(
            book.due(&want, &targets("localhost:5000"), at(29))
                .is_empty()
        );
        assert_eq!(book.due(&want, &targets("localhost:5000"), at(30)).len(), 1);
        book.finish(
            &want[0].key,
            &copied(&want[0], "sha256:1"),
            at(30),
            &wall(),
            0.5,
        );

        // Without spec.refresh the recheck period applies; a shorter refresh set later
        // applies from then on.
        let plain = wanted(&set(&["nginx:1.27"], "local", &[])).expect("wanted");
        assert!(
            book.due(&plain, &targets("localhost:5000"), at(45))
                .is_empty()
        );
        assert_eq!(
            book.due(&plain, &targets("localhost:5000"), at(60)).len(),
            1
        );
        book.finish(
            &plain[0].key,
            &copied(&plain[0], "sha256:1"),
            at(60),
            &wall(),
            0.5,
        );
        assert!(
            book.due(&plain, &targets("localhost:5000"), at(100))
                .is_empty()
        );
        assert!(
            book.due(&want, &targets("localhost:5000"), at(100))
                .is_empty()
        );
        assert_eq!(
            book.due(&want, &targets("localhost:5000"), at(130)).len(),
            1
        );

        refreshing.spec.refresh = Some("soon".into());
        let error = wanted(&refreshing).expect_err("bad refresh");
        assert!(error.starts_with("spec.refresh: "), "{error}");
    }

    #[test]
    fn a_copy_is_due_once_then_after_its_recheck_or_backoff() {
        let want = wanted(&set(&["nginx:1.27"], "local", &[])).expect("wanted");
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        let due = book.due(&want, &targets("localhost:5000"), start);
        assert_eq!(due.len(), 1);
        assert!(
            book.due(&want, &targets("localhost:5000"), start)
                .is_empty(),
            "a running copy is not started twice"
        );
        let status = book.status(&want[0].key).expect("status");
        assert_eq!(status.state, MirrorState::Copying);
        assert_eq!(
            status.reference,
            "localhost:5000/docker.io/library/nginx:1.27"
        );

        book.finish(
            &want[0].key,
            &copied(&want[0], "sha256:1"),
            start,
            &wall(),
            0.5,
        );
        let status = book.status(&want[0].key).expect("status");
        assert_eq!(status.state, MirrorState::Mirrored);
        assert_eq!(status.digest.as_deref(), Some("sha256:1"));
        assert_eq!(book.mirrored_in("local"), 1);
        assert!(
            book.due(&want, &targets("localhost:5000"), start + RECHECK / 2)
                .is_empty()
        );
        assert_eq!(
            book.due(&want, &targets("localhost:5000"), start + RECHECK)
                .len(),
            1,
            "the source tag is checked again"
        );

        // The source is down: the mirror still holds the image, so it stays mirrored.
        let later = start + RECHECK;
        book.finish(&want[0].key, &source_down(), later, &wall(), 0.5);
        let status = book.status(&want[0].key).expect("status");
        assert_eq!(status.state, MirrorState::Mirrored);
        assert!(
            status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("connection refused"))
        );
        assert!(
            book.due(
                &want,
                &targets("localhost:5000"),
                later + Duration::from_millis(900)
            )
            .is_empty()
        );
        assert_eq!(
            book.due(
                &want,
                &targets("localhost:5000"),
                later + Duration::from_secs(1)
            )
            .len(),
            1,
            "retried after the backoff"
        );
    }

    #[test]
    fn a_copy_that_never_landed_fails_and_backs_off_with_jitter() {
        let want = wanted(&set(&["nginx:1.27"], "missing", &[])).expect("wanted");
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        let due = book.due(&want, &BTreeMap::new(), start);
        assert_eq!(
            due.len(),
            1,
            "a copy into a missing Registry is tried, and fails with the reason"
        );
        book.finish(
            &want[0].key,
            &Attempt::Unusable("Registry missing not found".into()),
            start,
            &wall(),
            0.0,
        );
        let status = book.status(&want[0].key).expect("status");
        assert_eq!(status.state, MirrorState::Failed);
        assert_eq!(
            status.last_error.as_deref(),
            Some("Registry missing not found")
        );
        assert_eq!(backoff(1, 0.0), Duration::from_millis(750));
        assert_eq!(backoff(1, 1.0), Duration::from_millis(1250));
        assert_eq!(backoff(3, 0.5), Duration::from_secs(4));
        assert_eq!(backoff(30, 0.5), MAX_BACKOFF);
    }

    #[test]
    fn a_set_that_moves_to_another_registry_or_platforms_copies_again() {
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        let want = wanted(&set(&["nginx:1.27"], "local", &[])).expect("wanted");
        book.due(&want, &targets("localhost:5000"), start);
        book.finish(
            &want[0].key,
            &copied(&want[0], "sha256:1"),
            start,
            &wall(),
            0.5,
        );
        let moved = book.due(&want, &targets("localhost:5001"), start);
        assert_eq!(moved.len(), 1, "a new endpoint is a new copy");
        let status = book.status(&want[0].key).expect("status");
        assert_eq!(
            (status.state, status.reference.as_str()),
            (
                MirrorState::Copying,
                "localhost:5001/docker.io/library/nginx:1.27"
            )
        );
        let narrowed = wanted(&set(&["nginx:1.27"], "local", &["linux/amd64"])).expect("wanted");
        assert_eq!(
            book.due(&narrowed, &targets("localhost:5001"), start).len(),
            1,
            "other platforms are a new copy"
        );
        assert!(book.due(&[], &targets("localhost:5001"), start).is_empty());
        assert!(
            book.status(&want[0].key).is_none(),
            "an image no longer wanted is forgotten"
        );
    }

    #[test]
    fn a_restart_takes_up_the_status_and_checks_at_once() {
        let mut written = set(&["nginx:1.27"], "local", &[]);
        written.status = Some(ImageSetStatus {
            images: vec![ImageSetImageStatus {
                image: "nginx:1.27".into(),
                normalized: "docker.io/library/nginx:1.27".into(),
                mirror: Some(crate::api::ImageMirrorStatus {
                    reference: "localhost:5000/docker.io/library/nginx:1.27".into(),
                    state: MirrorState::Mirrored,
                    digest: Some("sha256:1".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut book = Book::new(RECHECK);
        let start = Instant::now();
        book.seed(&written, start);
        let want = wanted(&written).expect("wanted");
        assert_eq!(
            book.due(&want, &targets("localhost:5000"), start).len(),
            1,
            "checked at once"
        );
        let status = book.status(&want[0].key).expect("status");
        assert_eq!(
            status.state,
            MirrorState::Mirrored,
            "a restart does not make a mirrored image copying again"
        );
        assert_eq!(status.digest.as_deref(), Some("sha256:1"));
    }

    #[test]
    fn plain_http_is_for_loopback_cluster_local_and_private_addresses_only() {
        for endpoint in [
            "localhost:5000",
            "127.0.0.1:30500",
            "[::1]:5000",
            "registry.coral-system.svc:5000",
            "registry.coral-system.svc.cluster.local",
            "10.0.0.5:30500",
            "192.168.1.2",
            "[fd00::1]:5000",
        ] {
            assert!(
                may_use_plain_http(&endpoint.parse().expect("target")),
                "{endpoint}"
            );
        }
        for endpoint in [
            "registry.example.com",
            "8.8.8.8:5000",
            "svc.example.com:5000",
        ] {
            assert!(
                !may_use_plain_http(&endpoint.parse().expect("target")),
                "{endpoint}"
            );
        }
        let registry = |endpoint: &str, plain_http: bool| {
            Registry::new(
                "r",
                RegistrySpec {
                    endpoint: endpoint.into(),
                    tls: RegistryTls {
                        plain_http,
                        ca_secret: None,
                    },
                    credentials_secret: None,
                    ..RegistrySpec::default()
                },
            )
        };
        assert!(
            destination(&registry("localhost:5000", false))
                .expect("ok")
                .plain_http,
            "loopback is plain HTTP, as containerd treats it"
        );
        let mut with_ca = registry("localhost:5000", false);
        with_ca.spec.tls.ca_secret = Some(crate::api::SecretKey {
            name: "registry-ca".into(),
            key: None,
        });
        assert!(
            !destination(&with_ca).expect("ok").plain_http,
            "unless a CA says it speaks TLS"
        );
        assert!(
            !destination(&registry("registry.example.com", false))
                .expect("ok")
                .plain_http
        );
        let error = destination(&registry("registry.example.com", true)).expect_err("refused");
        assert!(
            error.contains("spec.tls.plainHTTP is allowed only for"),
            "{error}"
        );
        let error = destination(&registry("Bad Endpoint", false)).expect_err("refused");
        assert!(error.starts_with("spec.endpoint: "), "{error}");
    }

    #[test]
    fn failures_are_counted_by_the_side_that_failed() {
        let source = MirrorError::Registry {
            what: "reading a blob of",
            reference: "r".into(),
            message: "m".into(),
            transient: true,
        };
        let mirror = MirrorError::Registry {
            what: "writing a blob of",
            reference: "r".into(),
            message: "m".into(),
            transient: true,
        };
        assert_eq!(failure_reason(&source), "source");
        assert_eq!(failure_reason(&mirror), "mirror");
        let digest = MirrorError::Digest {
            reference: "r".into(),
            expected: "a".into(),
            got: "b".into(),
        };
        assert_eq!(failure_reason(&digest), "digest");
    }
}
