//! Registry credentials from pull secrets and `config.json` files, matched to images the way
//! the kubelet matches them: the key's host (globs allowed per label, `*.example.com`) and port
//! must match the image's registry, and the key's path must be a prefix of the image's path.
//! Docker Hub's aliases (`index.docker.io`, `registry-1.docker.io`, `https://index.docker.io/v1/`)
//! all mean `docker.io`. When several keys match, the most specific comes first. The agent
//! pulls with them, the controller and the mirror copy with them.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_cri::v1::AuthConfig;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use thiserror::Error;

use crate::image::ImageReference;

/// Secret type of a `config.json`-style pull secret (key `.dockerconfigjson`).
pub const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
/// Secret type of the legacy `.dockercfg` pull secret.
pub const DOCKER_CFG: &str = "kubernetes.io/dockercfg";

/// Credentials that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("{origin}: not valid JSON: {message}")]
    Json { origin: String, message: String },
    #[error("{origin}: entry {server:?}: {message}")]
    Entry {
        origin: String,
        server: String,
        message: String,
    },
    #[error("{origin}: type {kind:?} is not a pull secret ({DOCKER_CONFIG_JSON} or {DOCKER_CFG})")]
    SecretType { origin: String, kind: String },
    #[error("{origin}: has no {key} key")]
    MissingKey { origin: String, key: &'static str },
}

/// One credential, with the key it was filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The key as written (`registry.example.com:5000/team`).
    pub server: String,
    pub username: String,
    pub password: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl Credential {
    /// The CRI form. The server address stays empty: the credential was matched to the image
    /// already, and runtimes parse the address as a URL, which `host:port` keys are not.
    pub fn to_auth_config(&self) -> AuthConfig {
        AuthConfig {
            username: self.username.clone(),
            password: self.password.clone(),
            auth: String::new(),
            server_address: String::new(),
            identity_token: self.identity_token.clone(),
            registry_token: self.registry_token.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

/// A key parsed for matching.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Host labels, possibly globs.
    host: Vec<String>,
    port: Option<String>,
    path: String,
}

impl Pattern {
    fn parse(key: &str) -> Self {
        let key = key
            .strip_prefix("https://")
            .or_else(|| key.strip_prefix("http://"))
            .unwrap_or(key);
        let (authority, path) = key.split_once('/').unwrap_or((key, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => {
                (host, Some(port.to_string()))
            }
            _ => (authority, None),
        };
        let mut host = host.to_ascii_lowercase();
        let mut path = path.trim_end_matches('/').to_string();
        if is_docker_hub(&host) && port.is_none() {
            host = "docker.io".to_string();
            // `https://index.docker.io/v1/` is the historical key of all of Docker Hub.
            if path == "v1" {
                path.clear();
            }
        }
        Self {
            host: host.split('.').map(str::to_string).collect(),
            port,
            path,
        }
    }

    fn matches(&self, registry: &str, repository: &str) -> bool {
        let (host, port) = match registry.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => (host, Some(port)),
            _ => (registry, None),
        };
        let labels: Vec<&str> = host.split('.').collect();
        if labels.len() != self.host.len()
            || !self
                .host
                .iter()
                .zip(&labels)
                .all(|(pattern, label)| glob(pattern, &label.to_ascii_lowercase()))
        {
            return false;
        }
        if self.port.as_deref() != port {
            return false;
        }
        self.path.is_empty()
            || repository == self.path
            || repository
                .strip_prefix(&self.path)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com"
    )
}

/// Shell-style glob over one host label: `*` matches any run of characters. Linear in the
/// pattern times the text, whatever the stars: on a mismatch it only moves the last star on
/// (a recursive match was exponential in the number of stars, which a pull secret chooses).
fn glob(pattern: &str, text: &str) -> bool {
    // Bytes: `*` is ASCII, and a literal of valid UTF-8 only matches at a character boundary.
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    let (mut p, mut t) = (0, 0);
    // Where the last star was, and where in the text what it matches ends.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if pattern.get(p) == Some(&b'*') {
            star = Some((p, t));
            p += 1;
        } else if pattern.get(p) == Some(&text[t]) {
            p += 1;
            t += 1;
        } else if let Some((star_at, matched_to)) = star {
            p = star_at + 1;
            t = matched_to + 1;
            star = Some((star_at, t));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Credentials from any number of sources, in the order they were added.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    entries: Vec<(Pattern, Credential)>,
}

impl Keyring {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds every credential of `other`, after this keyring's own.
    pub fn extend(&mut self, other: &Keyring) {
        self.entries.extend(other.entries.iter().cloned());
    }

    /// Reads a `config.json` (`{"auths": {...}}`), as in `.dockerconfigjson` secrets and
    /// `~/.docker/config.json`.
    pub fn add_config_json(&mut self, bytes: &[u8], origin: &str) -> Result<(), AuthError> {
        let config: ConfigJson = parse_json(bytes, origin)?;
        self.add_entries(config.auths, origin)
    }

    /// Reads a legacy `.dockercfg` (the `auths` map without its wrapper).
    pub fn add_dockercfg(&mut self, bytes: &[u8], origin: &str) -> Result<(), AuthError> {
        let auths: BTreeMap<String, Entry> = parse_json(bytes, origin)?;
        self.add_entries(auths, origin)
    }

    /// Reads a pull secret of either type.
    pub fn add_secret(&mut self, secret: &Secret) -> Result<(), AuthError> {
        let origin = format!(
            "secret {}/{}",
            secret.metadata.namespace.as_deref().unwrap_or_default(),
            secret.metadata.name.as_deref().unwrap_or_default()
        );
        let kind = secret.type_.as_deref().unwrap_or_default();
        let (key, legacy) = match kind {
            DOCKER_CONFIG_JSON => (".dockerconfigjson", false),
            DOCKER_CFG => (".dockercfg", true),
            _ => {
                return Err(AuthError::SecretType {
                    origin,
                    kind: kind.to_string(),
                });
            }
        };
        let Some(data) = secret.data.as_ref().and_then(|d| d.get(key)) else {
            return Err(AuthError::MissingKey { origin, key });
        };
        if legacy {
            self.add_dockercfg(&data.0, &origin)
        } else {
            self.add_config_json(&data.0, &origin)
        }
    }

    fn add_entries(
        &mut self,
        auths: BTreeMap<String, Entry>,
        origin: &str,
    ) -> Result<(), AuthError> {
        for (server, entry) in auths {
            let entry_error = |message: String| AuthError::Entry {
                origin: origin.to_string(),
                server: server.clone(),
                message,
            };
            let (mut username, mut password) = (entry.username, entry.password);
            if !entry.auth.is_empty() {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(entry.auth.trim())
                    .map_err(|e| entry_error(format!("auth is not base64: {e}")))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| entry_error("auth is not UTF-8".to_string()))?;
                let (user, pass) = decoded
                    .split_once(':')
                    .ok_or_else(|| entry_error("auth is not username:password".to_string()))?;
                username = user.to_string();
                password = pass.to_string();
            }
            self.entries.push((
                Pattern::parse(&server),
                Credential {
                    server,
                    username,
                    password,
                    identity_token: entry.identity_token,
                    registry_token: entry.registry_token,
                },
            ));
        }
        Ok(())
    }

    /// Every credential matching the image, most specific key first (the kubelet's order:
    /// keys sorted in reverse, so `host/team/app` precedes `host/team` precedes `host`), then
    /// in the order they were added.
    pub fn lookup(&self, image: &ImageReference) -> Vec<&Credential> {
        let mut matched: Vec<(usize, &Pattern, &Credential)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, (pattern, _))| pattern.matches(image.registry(), image.repository()))
            .map(|(i, (pattern, credential))| (i, pattern, credential))
            .collect();
        matched.sort_by(|(ia, pa, _), (ib, pb, _)| {
            let key = |p: &Pattern| (p.host.join("."), p.port.clone(), p.path.clone());
            key(pb).cmp(&key(pa)).then(ia.cmp(ib))
        });
        let mut seen = Vec::new();
        matched
            .into_iter()
            .filter_map(|(_, _, credential)| {
                let duplicate = seen.iter().any(|c: &&Credential| {
                    c.username == credential.username
                        && c.password == credential.password
                        && c.identity_token == credential.identity_token
                        && c.registry_token == credential.registry_token
                });
                if duplicate {
                    None
                } else {
                    seen.push(credential);
                    Some(credential)
                }
            })
            .collect()
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], origin: &str) -> Result<T, AuthError> {
    serde_json::from_slice(bytes).map_err(|e| AuthError::Json {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_globs_match_in_linear_time() {
        for (pattern, text, matches) in [
            ("*", "mirror", true),
            ("mirror", "mirror", true),
            ("mir*", "mirror", true),
            ("*or", "mirror", true),
            ("m*r*r", "mirror", true),
            ("m*x", "mirror", false),
            ("**", "", true),
            ("a*", "", false),
            ("*ré*", "miré", true),
        ] {
            assert_eq!(glob(pattern, text), matches, "{pattern} {text}");
        }
        // Found by the pull_secrets fuzz target: the recursive match of these took hours.
        let stars = format!("l{}={}ocalhost", "*".repeat(100), "*".repeat(30));
        assert!(!glob(&stars, "localhost"));
        assert!(glob(&stars, "l=ocalhost"));
    }

    fn keyring(config: &str) -> Keyring {
        let mut keyring = Keyring::new();
        keyring
            .add_config_json(config.as_bytes(), "test")
            .expect("valid config");
        keyring
    }

    fn users(keyring: &Keyring, image: &str) -> Vec<String> {
        let image = ImageReference::parse(image).expect("valid reference");
        keyring
            .lookup(&image)
            .into_iter()
            .map(|c| c.username.clone())
            .collect()
    }

    #[test]
    fn keys_match_host_port_path_prefix_and_wildcards_like_the_kubelet() {
        let keyring = keyring(
            r#"{"auths": {
                "registry.example.com": {"username": "host"},
                "registry.example.com/team": {"username": "team"},
                "registry.example.com/team/app": {"username": "app"},
                "https://registry.example.com:5000": {"username": "port"},
                "*.mirror.example.com": {"username": "wild"},
                "https://index.docker.io/v1/": {"username": "hub"},
                "localhost:5000": {"username": "local"}
            }}"#,
        );
        let cases: &[(&str, &[&str])] = &[
            ("registry.example.com/team/app:1", &["app", "team", "host"]),
            ("registry.example.com/team/other:1", &["team", "host"]),
            ("registry.example.com/teamx/app:1", &["host"]),
            ("registry.example.com:5000/team/app:1", &["port"]),
            ("registry.example.com:5001/x:1", &[]),
            ("eu.mirror.example.com/x:1", &["wild"]),
            ("a.eu.mirror.example.com/x:1", &[]),
            ("nginx:1.27", &["hub"]),
            ("index.docker.io/library/nginx", &["hub"]),
            ("localhost:5000/x", &["local"]),
            ("localhost/x", &[]),
            ("quay.io/x/y", &[]),
        ];
        for (image, expected) in cases {
            assert_eq!(users(&keyring, image), *expected, "{image}");
        }
    }

    #[test]
    fn docker_hub_aliases_all_mean_docker_hub() {
        for key in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
        ] {
            let keyring = keyring(&format!(r#"{{"auths": {{"{key}": {{"username": "u"}}}}}}"#));
            assert_eq!(users(&keyring, "busybox"), ["u"], "{key}");
            assert_eq!(
                users(&keyring, "ghcr.io/busybox"),
                Vec::<String>::new(),
                "{key}"
            );
        }
    }

    #[test]
    fn auth_field_and_legacy_dockercfg_are_decoded() {
        let mut keyring = Keyring::new();
        keyring
            .add_dockercfg(
                br#"{"registry.example.com": {"auth": "YWxpY2U6czNjcjN0Og=="}}"#,
                "legacy",
            )
            .expect("valid dockercfg");
        let image = ImageReference::parse("registry.example.com/x").expect("valid");
        let found = keyring.lookup(&image);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].username, "alice");
        assert_eq!(found[0].password, "s3cr3t:", "only the first ':' splits");
        let auth = found[0].to_auth_config();
        assert_eq!(auth.server_address, "");
        assert_eq!(auth.username, "alice");
    }

    #[test]
    fn unreadable_credentials_are_named() {
        let mut keyring = Keyring::new();
        let error = keyring
            .add_config_json(b"{", "secret shop/pull")
            .expect_err("not JSON");
        assert!(
            error
                .to_string()
                .starts_with("secret shop/pull: not valid JSON"),
            "{error}"
        );
        let error = keyring
            .add_config_json(br#"{"auths": {"r.example.com": {"auth": "%%%"}}}"#, "cfg")
            .expect_err("bad base64");
        assert_eq!(
            error.to_string().split(" is not base64").next(),
            Some("cfg: entry \"r.example.com\": auth")
        );
        let error = keyring
            .add_config_json(
                br#"{"auths": {"r.example.com": {"auth": "bm9jb2xvbg=="}}}"#,
                "cfg",
            )
            .expect_err("no colon");
        assert!(
            error.to_string().contains("not username:password"),
            "{error}"
        );

        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "tls", "namespace": "shop"},
            "type": "kubernetes.io/tls",
            "data": {},
        }))
        .expect("secret");
        let error = keyring.add_secret(&secret).expect_err("wrong type");
        assert!(
            error
                .to_string()
                .contains("secret shop/tls: type \"kubernetes.io/tls\""),
            "{error}"
        );
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pull", "namespace": "shop"},
            "type": DOCKER_CONFIG_JSON,
            "data": {},
        }))
        .expect("secret");
        let error = keyring.add_secret(&secret).expect_err("no key");
        assert_eq!(
            error.to_string(),
            "secret shop/pull: has no .dockerconfigjson key"
        );
    }

    #[test]
    fn pull_secrets_of_both_types_are_read() {
        let encode = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pull", "namespace": "shop"},
            "type": DOCKER_CONFIG_JSON,
            "data": {".dockerconfigjson": encode(r#"{"auths": {"r.example.com": {"username": "a", "password": "b"}}}"#)},
        }))
        .expect("secret");
        let legacy: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "old", "namespace": "shop"},
            "type": DOCKER_CFG,
            "data": {".dockercfg": encode(r#"{"r.example.com": {"username": "c", "password": "d"}}"#)},
        }))
        .expect("secret");
        let mut keyring = Keyring::new();
        keyring.add_secret(&secret).expect("readable");
        keyring.add_secret(&legacy).expect("readable");
        assert_eq!(
            users(&keyring, "r.example.com/app:1"),
            ["a", "c"],
            "both, in order"
        );
    }
}
