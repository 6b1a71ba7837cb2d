//! Parsing and normalization of image references, following the grammar that container
//! runtimes (containerd, CRI-O, Docker) accept.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Tag used when a reference carries neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";
/// Repository namespace for one-segment Docker Hub names (`nginx` is `library/nginx`).
const OFFICIAL_NAMESPACE: &str = "library";
/// Legacy Docker Hub host, an alias of `docker.io`.
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
/// Longest name (registry and repository) a registry accepts.
const MAX_NAME_LENGTH: usize = 255;
/// Longest tag.
const MAX_TAG_LENGTH: usize = 128;

/// Why a string is not a valid image reference.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference {0:?} contains whitespace or control characters")]
    Whitespace(String),
    #[error("image reference {reference:?} has an invalid registry host {host:?}: {reason}")]
    InvalidRegistry {
        reference: String,
        host: String,
        reason: &'static str,
    },
    #[error(
        "image reference {reference:?} has an invalid repository path component {component:?}: \
         use lower-case letters, digits and single separators (., _, __, -) between them"
    )]
    InvalidPathComponent {
        reference: String,
        component: String,
    },
    #[error("image reference {reference:?} must be lower case in its repository path {path:?}")]
    UpperCase { reference: String, path: String },
    #[error("image reference {reference:?} has an empty repository path component")]
    EmptyPathComponent { reference: String },
    #[error(
        "image reference {reference:?} is too long: its full name (registry/repository) is {length} characters, at most {MAX_NAME_LENGTH} are allowed"
    )]
    NameTooLong { reference: String, length: usize },
    #[error(
        "image reference {reference:?} has an invalid tag {tag:?}: a tag is 1 to {MAX_TAG_LENGTH} characters of \
         letters, digits, '_', '.' and '-', and does not start with '.' or '-'"
    )]
    InvalidTag { reference: String, tag: String },
    #[error("image reference {reference:?} has an invalid digest {digest:?}: {reason}")]
    InvalidDigest {
        reference: String,
        digest: String,
        reason: String,
    },
    #[error("image reference {reference:?} names no repository")]
    MissingRepository { reference: String },
}

/// A parsed image reference in its normalized form.
///
/// `nginx`, `docker.io/nginx:latest` and `index.docker.io/library/nginx` all parse to
/// `docker.io/library/nginx:latest`. A reference that carries a digest keeps it; the default tag
/// is only added when there is neither a tag nor a digest, as runtimes do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageReference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageReference {
    /// Parses and normalizes `input`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ReferenceError::Whitespace(input.to_string()));
        }
        let reference = input.to_string();

        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => (rest, Some(parse_digest(&reference, digest)?)),
            None => (input, None),
        };

        // A ':' after the last '/' separates the tag; one before it belongs to a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let split = last_slash + i;
                let tag = &rest[split + 1..];
                if !is_valid_tag(tag) {
                    return Err(ReferenceError::InvalidTag {
                        reference,
                        tag: tag.to_string(),
                    });
                }
                (&rest[..split], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(ReferenceError::MissingRepository { reference });
        }

        let (registry, path) = split_registry(name);
        let registry = match registry {
            Some(host) => {
                validate_registry(&reference, host)?;
                if host == LEGACY_DOCKER_HUB {
                    DEFAULT_REGISTRY.to_string()
                } else {
                    host.to_string()
                }
            }
            None => DEFAULT_REGISTRY.to_string(),
        };
        validate_path(&reference, path)?;
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("{OFFICIAL_NAMESPACE}/{path}")
        } else {
            path.to_string()
        };
        // The limit holds for the name as Coral writes it (with the default registry and
        // namespace filled in), so that every reference it prints parses again.
        let length = registry.len() + 1 + repository.len();
        if length > MAX_NAME_LENGTH {
            return Err(ReferenceError::NameTooLong { length, reference });
        }

        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Registry host, with its port when it has one (`docker.io`, `localhost:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path inside the registry (`library/nginx`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// Tag, when the reference has one (always when it has no digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// Digest (`sha256:…`), when the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Splits off the registry host the way Docker does: the first component is a host when it
/// contains a '.' or a ':', is `localhost`, or has upper-case letters (repositories cannot).
fn split_registry(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn validate_registry(reference: &str, host: &str) -> Result<(), ReferenceError> {
    let invalid = |reason: &'static str| ReferenceError::InvalidRegistry {
        reference: reference.to_string(),
        host: host.to_string(),
        reason,
    };
    let (hostname, port) = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: [addr] or [addr]:port
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 address must be closed with ']'"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid("not a valid IPv6 address"));
        }
        match after {
            "" => return Ok(()),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(invalid("unexpected characters after the IPv6 address")),
            },
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
            return Err(invalid("the port must be a number"));
        }
        match port.parse::<u32>() {
            Ok(1..=65535) => {}
            _ => return Err(invalid("the port must be between 1 and 65535")),
        }
    }
    if let Some(name) = hostname {
        if name.is_empty() {
            return Err(invalid("the host name is empty"));
        }
        for label in name.split('.') {
            let bytes = label.as_bytes();
            let valid = !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
            if !valid {
                return Err(invalid(
                    "each dot-separated part of a host name is letters, digits and inner '-'",
                ));
            }
        }
    }
    Ok(())
}

fn validate_path(reference: &str, path: &str) -> Result<(), ReferenceError> {
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(ReferenceError::UpperCase {
            reference: reference.to_string(),
            path: path.to_string(),
        });
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err(ReferenceError::EmptyPathComponent {
                reference: reference.to_string(),
            });
        }
        if !is_valid_path_component(component) {
            return Err(ReferenceError::InvalidPathComponent {
                reference: reference.to_string(),
                component: component.to_string(),
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`
fn is_valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            while i < bytes.len() && alnum(bytes[i]) {
                i += 1;
            }
            expect_alnum = false;
            continue;
        }
        if expect_alnum {
            return false;
        }
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > start);
        expect_alnum = true;
    }
    !expect_alnum
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LENGTH
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Validates an OCI digest (`algorithm:encoded`) and returns it.
/// Whether `digest` is a content digest as references carry them (`sha256:` and 64 hex digits).
pub fn is_digest(digest: &str) -> bool {
    parse_digest(digest, digest).is_ok()
}

/// The reference without its digest, when it has a tag too (`nginx:1.27@sha256:…` gives
/// `nginx:1.27`): the image a pinned reference pins.
pub fn unpinned(reference: &ImageReference) -> Option<ImageReference> {
    (reference.tag.is_some() && reference.digest.is_some()).then(|| ImageReference {
        digest: None,
        ..reference.clone()
    })
}

fn parse_digest(reference: &str, digest: &str) -> Result<String, ReferenceError> {
    let invalid = |reason: String| ReferenceError::InvalidDigest {
        reference: reference.to_string(),
        digest: digest.to_string(),
        reason,
    };
    let (algorithm, encoded) = digest.split_once(':').ok_or_else(|| {
        invalid("a digest is ALGORITHM:HEX, such as sha256:<64 hex digits>".into())
    })?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm.split(['+', '.', '_', '-']).all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_lowercase()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
    if !algorithm_ok {
        return Err(invalid(format!("invalid algorithm {algorithm:?}")));
    }
    let expected_len = match algorithm {
        "sha256" => Some(64),
        "sha384" => Some(96),
        "sha512" => Some(128),
        _ => None,
    };
    match expected_len {
        Some(len) => {
            if encoded.len() != len
                || !encoded
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(invalid(format!(
                    "a {algorithm} digest is {len} lower-case hex digits, got {} characters",
                    encoded.len()
                )));
            }
        }
        None => {
            if encoded.len() < 32
                || !encoded
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
            {
                return Err(invalid(
                    "the encoded part must be at least 32 characters of [a-zA-Z0-9=_-]".into(),
                ));
            }
        }
    }
    Ok(digest.to_string())
}
