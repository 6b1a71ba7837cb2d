use super::*;

const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn valid_references_normalize_like_container_runtimes() {
    let cases: &[(&str, &str)] = &[
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.27", "docker.io/library/nginx:1.27"),
        ("library/nginx", "docker.io/library/nginx:latest"),
        ("docker.io/nginx", "docker.io/library/nginx:latest"),
        (
            "docker.io/library/nginx:latest",
            "docker.io/library/nginx:latest",
        ),
        (
            "index.docker.io/library/nginx",
            "docker.io/library/nginx:latest",
        ),
        ("index.docker.io/nginx:1.0", "docker.io/library/nginx:1.0"),
        ("bitnami/redis:7.2", "docker.io/bitnami/redis:7.2"),
        (
            "quay.io/prometheus/node-exporter:v1.8.2",
            "quay.io/prometheus/node-exporter:v1.8.2",
        ),
        ("ghcr.io/org/team/app:1", "ghcr.io/org/team/app:1"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:dev", "localhost:5000/app:dev"),
        ("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest"),
        ("[::1]:5000/app:v2", "[::1]:5000/app:v2"),
        ("[fe80::1]/app", "[fe80::1]/app:latest"),
        (
            "Registry.Example.COM/app",
            "Registry.Example.COM/app:latest",
        ),
        (
            "my-registry.example.com:443/a/b/c:tag",
            "my-registry.example.com:443/a/b/c:tag",
        ),
        (
            &format!("nginx@{SHA}"),
            &format!("docker.io/library/nginx@{SHA}"),
        ),
        (
            &format!("nginx:1.27@{SHA}"),
            &format!("docker.io/library/nginx:1.27@{SHA}"),
        ),
        (
            &format!("localhost:5000/app@{SHA}"),
            &format!("localhost:5000/app@{SHA}"),
        ),
        (
            "a.b/c_d/e__f/g-h/i--j/k.l:T_a.g-1",
            "a.b/c_d/e__f/g-h/i--j/k.l:T_a.g-1",
        ),
        ("nginx:_tag", "docker.io/library/nginx:_tag"),
        ("localhost:5000", "docker.io/library/localhost:5000"),
        ("example.com/app:1.0-rc.1", "example.com/app:1.0-rc.1"),
        (
            "example.com/app@sha512:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "example.com/app@sha512:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
        (
            "example.com/app@multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
            "example.com/app@multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
        ),
    ];
    for (input, expected) in cases {
        let parsed = ImageReference::parse(input)
            .unwrap_or_else(|e| panic!("{input:?} should be valid, got error: {e}"));
        assert_eq!(parsed.to_string(), *expected, "normalizing {input:?}");
        // Normalization is idempotent.
        let again = ImageReference::parse(&parsed.to_string()).expect("normalized form parses");
        assert_eq!(again, parsed, "re-parsing the normal form of {input:?}");
    }
}

#[test]
fn invalid_references_are_rejected_with_a_reason() {
    let long_name = format!("example.com/{}", "a".repeat(250));
    let long_tag = format!("nginx:{}", "t".repeat(129));
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        (" nginx", "whitespace"),
        ("nginx latest", "whitespace"),
        ("Nginx", "lower case"),
        ("docker.io/Library/nginx", "lower case"),
        ("nginx:", "invalid tag"),
        ("nginx:-dash", "invalid tag"),
        ("nginx:.dot", "invalid tag"),
        ("nginx:a+b", "invalid tag"),
        (&long_tag, "invalid tag"),
        (":tag", "names no repository"),
        ("example.com//app", "empty repository path component"),
        ("example.com/app/", "empty repository path component"),
        ("/app", "empty repository path component"),
        ("app-", "invalid repository path component"),
        ("-app", "invalid repository path component"),
        ("a..b", "invalid repository path component"),
        ("a___b", "invalid repository path component"),
        ("a_.b", "invalid repository path component"),
        ("ex@mple/app", "invalid digest"),
        ("nginx@sha256:abc", "sha256 digest is 64"),
        (
            "nginx@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256 digest is 64",
        ),
        ("nginx@md5", "ALGORITHM:HEX"),
        (
            "nginx@:0123456789abcdef0123456789abcdef",
            "invalid algorithm",
        ),
        (
            "nginx@Sha:0123456789abcdef0123456789abcdef",
            "invalid algorithm",
        ),
        ("nginx@foo:short", "at least 32"),
        ("example.com:port/app", "port must be a number"),
        ("example.com:0/app", "between 1 and 65535"),
        ("example.com:70000/app", "between 1 and 65535"),
        ("example.com:/app", "port must be a number"),
        ("-bad.example.com/app", "host name"),
        ("bad_host.com/app", "host name"),
        ("a..com/app", "host name"),
        ("[::1/app", "closed with ']'"),
        ("[zz::1]/app", "not a valid IPv6"),
        ("[::1]x/app", "after the IPv6"),
        (&long_name, "too long"),
    ];
    for (input, reason) in cases {
        match ImageReference::parse(input) {
            Ok(parsed) => panic!("{input:?} should be invalid, parsed as {parsed}"),
            Err(e) => assert!(
                e.to_string().contains(reason),
                "error for {input:?} should mention {reason:?}, got: {e}"
            ),
        }
    }
}

#[test]
fn the_length_limit_holds_for_the_name_as_printed() {
    // Short form within 255 characters, full name (docker.io/library/…) beyond: found by the
    // image_reference fuzz target, whose invariant is that every printed reference parses.
    let short = "a".repeat(240);
    let error = ImageReference::parse(&short).expect_err("too long once normalized");
    assert!(error.to_string().contains("is 258 characters"), "{error}");
    let fits = "a".repeat(255 - "docker.io/library/".len());
    let parsed = ImageReference::parse(&fits).expect("fits");
    ImageReference::parse(&parsed.to_string()).expect("prints as a reference that parses");
}

#[test]
fn aliases_of_one_image_share_a_label_key() {
    let key = |r: &str| label_key(&ImageReference::parse(r).expect("valid"));
    let nginx = key("nginx");
    assert_eq!(nginx, key("docker.io/nginx:latest"));
    assert_eq!(nginx, key("index.docker.io/library/nginx"));
    assert_ne!(nginx, key("nginx:1.27"));
    assert_ne!(key("nginx:1.27"), key(&format!("nginx:1.27@{SHA}")));
}

#[test]
fn label_key_is_the_sha256_prefix_of_the_normalized_reference() {
    // printf 'docker.io/library/nginx:1.27' | sha256sum | cut -c1-40
    let reference = ImageReference::parse("nginx:1.27").expect("valid");
    assert_eq!(
        label_key(&reference),
        "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c"
    );
    assert!(is_image_label(&label_key(&reference)));
    assert!(!is_image_label("image.coral.dev/short"));
    assert!(!is_image_label("kubernetes.io/hostname"));
}

#[test]
fn parts_of_a_reference_are_exposed() {
    let r = ImageReference::parse(&format!("localhost:5000/team/app:v1@{SHA}")).expect("valid");
    assert_eq!(r.registry(), "localhost:5000");
    assert_eq!(r.repository(), "team/app");
    assert_eq!(r.tag(), Some("v1"));
    assert_eq!(r.digest(), Some(SHA));
    assert_eq!(r.name(), "localhost:5000/team/app");
    let digest_only = ImageReference::parse(&format!("nginx@{SHA}")).expect("valid");
    assert_eq!(digest_only.tag(), None, "no default tag beside a digest");
}
