//! Copying one image from its source registry to the mirror, over the OCI distribution API
//! (`oci-client`): the tag resolved to a digest, the manifest or the whole image index (every
//! platform, or those asked for), blobs the mirror holds skipped, the others streamed from the
//! source into the mirror (memory does not grow with a layer's size), every manifest pushed as
//! the bytes the source served so that its digest stays, the tag last.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use thiserror::Error;

use super::plan::{
    Content, Descriptor, MANIFEST_TYPES, Manifest, MirrorTarget, PlanError, Platform,
    finished_digest, is_loopback, mirror_reference, sha256_digest,
};
use crate::credentials::Keyring;
use crate::image::ImageReference;

/// Time to connect to a registry, and the longest silence while reading from one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Blobs of one image copied at once.
pub const DEFAULT_BLOB_CONCURRENCY: usize = 4;

/// Why an image was not mirrored.
#[derive(Debug, Error)]
pub enum MirrorError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{what} {reference}: {message}")]
    Registry {
        /// What was being done, naming the side: "reading the manifest of", "reading a blob
        /// of" (the source), "writing to the mirror", "writing a blob of", "writing a
        /// manifest of" (the mirror).
        what: &'static str,
        reference: String,
        message: String,
        /// Whether trying again may help (the network, a registry's 5xx or 429).
        transient: bool,
    },
    #[error("{reference}: the source served a manifest whose digest is {got}, not {expected}")]
    Digest {
        reference: String,
        expected: String,
        got: String,
    },
}

impl MirrorError {
    /// Whether the failure was on the source's side (reading from it, or what it served).
    pub fn on_source(&self) -> bool {
        match self {
            Self::Registry { what, .. } => what.starts_with("reading"),
            Self::Digest { .. } => true,
            Self::Plan(_) => false,
        }
    }

    /// Whether trying again may help: only a registry failure marked transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Registry {
                transient: true,
                ..
            }
        )
    }
}

/// What mirroring one image did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub source: ImageReference,
    pub mirror: ImageReference,
    /// The digest the source reference resolved to.
    pub source_digest: String,
    /// The digest of what the mirror serves under the mirror reference: the same, unless some
    /// platforms of an index were left out (then a new index holds the others).
    pub mirror_digest: String,
    /// The mirror held the image already: nothing was transferred.
    pub already: bool,
    pub blobs_copied: usize,
    pub blobs_skipped: usize,
    pub bytes_copied: u64,
    /// Size of the image as its manifests give it (config and layers of every platform
    /// copied, and the manifests); `None` for an index the mirror held already (its children
    /// are not read again).
    pub size_bytes: Option<u64>,
    pub took: Duration,
}

/// Copies images between registries, with credentials from a keyring for both sides.
pub struct Copier {
    client: Client,
    /// Blob uploads: one streamed PUT each (oci-client sends a stream as a series of
    /// requests, each waiting for the last).
    http: reqwest::Client,
    /// Registries spoken to over plain HTTP.
    plain_http: Vec<String>,
    keyring: Keyring,
    blob_concurrency: usize,
}

fn oci_reference(reference: &ImageReference) -> Reference {
    match (reference.tag(), reference.digest()) {
        (_, Some(digest)) => Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            digest.to_string(),
        ),
        (Some(tag), None) => Reference::with_tag(
            reference.registry().to_string(),
            reference.repository().to_string(),
            tag.to_string(),
        ),
        (None, None) => Reference::with_tag(
            reference.registry().to_string(),
            reference.repository().to_string(),
            crate::image::DEFAULT_TAG.to_string(),
        ),
    }
}

fn with_digest(reference: &Reference, digest: &str) -> Reference {
    Reference::with_digest(
        reference.registry().to_string(),
        reference.repository().to_string(),
        digest.to_string(),
    )
}

/// The error of a failed registry request: while doing `what` to `reference`.
fn registry_error(
    what: &'static str,
    reference: impl ToString,
) -> impl FnOnce(OciDistributionError) -> MirrorError {
    let reference = reference.to_string();
    move |error| MirrorError::Registry {
        what,
        reference,
        transient: is_transient(&error),
        message: error.to_string(),
    }
}

/// Whether a failed request may succeed when tried again: the network failed, or the registry
/// said it is overloaded or broken (not: unauthorized, not found, invalid).
fn is_transient(error: &OciDistributionError) -> bool {
    match error {
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        _ => false,
    }
}

impl Copier {
    /// A copier that speaks plain HTTP to `plain_http` registries (loopback ones, as
    /// containerd does) and HTTPS with the system's roots to the others.
    pub fn new(
        keyring: Keyring,
        plain_http: Vec<String>,
        blob_concurrency: usize,
    ) -> anyhow::Result<Self> {
        Self::with_roots(keyring, plain_http, &[], blob_concurrency)
    }

    /// As [`Copier::new`], trusting the certificates of the PEM bundle `roots` beside the
    /// system's roots (a Registry's CA).
    pub fn with_roots(
        keyring: Keyring,
        plain_http: Vec<String>,
        roots: &[u8],
        blob_concurrency: usize,
    ) -> anyhow::Result<Self> {
        // reqwest runs on rustls without a provider of its own: the ring one Coral uses (an
        // error only says one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certificates = pem_certificates(roots)?;
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http.clone()),
            read_timeout: Some(READ_TIMEOUT),
            connect_timeout: Some(CONNECT_TIMEOUT),
            extra_root_certificates: certificates
                .iter()
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            ..ClientConfig::default()
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT);
        for pem in &certificates {
            let certificate = reqwest::Certificate::from_pem(pem).map_err(|e| {
                anyhow::anyhow!(
                    "the registry CA bundle holds a certificate that cannot be read: {e}"
                )
            })?;
            http = http.add_root_certificate(certificate);
        }
        let http = http
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the HTTP client for registries: {e}"))?;
        Ok(Self {
            client: Client::new(config),
            http,
            plain_http,
            keyring,
            blob_concurrency: blob_concurrency.max(1),
        })
    }

    /// A copier for images of `sources` into `target`: plain HTTP to the loopback ones.
    pub fn for_target<'a>(
        keyring: Keyring,
        target: &MirrorTarget,
        sources: impl IntoIterator<Item = &'a ImageReference>,
        blob_concurrency: usize,
    ) -> anyhow::Result<Self> {
        let mut plain: Vec<String> = sources
            .into_iter()
            .map(|s| s.registry().to_string())
            .filter(|r| is_loopback(r))
            .collect();
        if target.is_loopback() {
            plain.push(target.endpoint().to_string());
        }
        plain.sort();
        plain.dedup();
        Self::new(keyring, plain, blob_concurrency)
    }

    /// Whether `target` answers the registry API with the keyring's credentials for it:
    /// `GET /v2/`, and for a registry that hands out tokens, a pull token for a repository
    /// under the target. The error says what failed.
    pub async fn probe(&self, target: &MirrorTarget) -> Result<(), String> {
        let endpoint = target.endpoint();
        let scheme = self.scheme(endpoint);
        let probe = ImageReference::parse(&format!("{target}/coral-probe"))
            .map_err(|e| format!("the endpoint {target} does not make a reference: {e}"))?;
        let auth = self.auth(&probe);
        let mut request = self.http.get(format!("{scheme}://{endpoint}/v2/"));
        if let Some(header) = authorization(&auth, None) {
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {scheme}://{endpoint}/v2/: {}", error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let bearer = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer"));
        if status == reqwest::StatusCode::UNAUTHORIZED && bearer {
            return self
                .client
                .auth(&oci_reference(&probe), &auth, RegistryOperation::Pull)
                .await
                .map(|_| ())
                .map_err(|e| format!("the registry's token service refused: {e}"));
        }
        let (message, _) = refusal(&format!("GET {scheme}://{endpoint}/v2/"), response).await;
        Err(if status == reqwest::StatusCode::UNAUTHORIZED {
            match auth {
                RegistryAuth::Anonymous => format!("{message} (no credentials for {endpoint})"),
                _ => format!("{message} (the credentials were refused)"),
            }
        } else {
            message
        })
    }

    /// Whether `target` serves the registry API to anyone, without credentials: `GET /v2/`
    /// answers 200. A registry that asks for credentials (401) does not; one that hands out
    /// tokens is trusted to check them for each repository.
    pub async fn serves_anonymously(&self, target: &MirrorTarget) -> Result<bool, String> {
        let endpoint = target.endpoint();
        let scheme = self.scheme(endpoint);
        let url = format!("{scheme}://{endpoint}/v2/");
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        Ok(response.status().is_success())
    }

    /// Deletes the manifest `digest` of `reference`'s repository from its registry (`DELETE
    /// /v2/<name>/manifests/<digest>`): what the registry's garbage collection then frees.
    /// `Ok(false)` when the registry had no such manifest.
    pub async fn delete(&self, reference: &ImageReference, digest: &str) -> Result<bool, String> {
        let endpoint = reference.registry();
        let scheme = self.scheme(endpoint);
        let url = format!(
            "{scheme}://{endpoint}/v2/{}/manifests/{digest}",
            reference.repository()
        );
        let auth = self.auth(reference);
        let token = self
            .client
            .auth(&oci_reference(reference), &auth, RegistryOperation::Push)
            .await
            .map_err(|e| format!("DELETE {url}: the registry's token service refused: {e}"))?;
        let mut request = self.http.delete(&url);
        if let Some(header) = authorization(&auth, token) {
            request = request.header(reqwest::header::AUTHORIZATION, header);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("DELETE {url}: {}", error_chain(&e)))?;
        match response.status() {
            status if status.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            reqwest::StatusCode::METHOD_NOT_ALLOWED => Err(format!(
                "DELETE {url}: 405: the registry does not allow deletes (distribution: storage.delete.enabled: true, or REGISTRY_STORAGE_DELETE_ENABLED=true)"
            )),
            _ => Err(refusal(&format!("DELETE {url}"), response).await.0),
        }
    }

    /// `http` for a registry spoken to over plain HTTP, else `https`.
    fn scheme(&self, registry: &str) -> &'static str {
        if self.plain_http.iter().any(|r| r == registry) {
            "http"
        } else {
            "https"
        }
    }

    fn auth(&self, image: &ImageReference) -> RegistryAuth {
        match self.keyring.lookup(image).first() {
            Some(credential) if !credential.registry_token.is_empty() => {
                RegistryAuth::Bearer(credential.registry_token.clone())
            }
            Some(credential) if !credential.username.is_empty() => {
                RegistryAuth::Basic(credential.username.clone(), credential.password.clone())
            }
            _ => RegistryAuth::Anonymous,
        }
    }

    /// Mirrors `source` into `target`, with the `platforms` of an index (all when empty).
    pub async fn copy(
        &self,
        source: &ImageReference,
        target: &MirrorTarget,
        platforms: &[Platform],
    ) -> Result<Copied, MirrorError> {
        let started = Instant::now();
        let mirror = mirror_reference(source, target)?;
        let from = oci_reference(source);
        let to = oci_reference(&mirror);
        let source_auth = self.auth(source);
        let mirror_auth = self.auth(&mirror);
        self.client
            .auth(&from, &source_auth, RegistryOperation::Pull)
            .await
            .map_err(registry_error("reading the manifest of", source))?;
        let token = self
            .client
            .auth(&to, &mirror_auth, RegistryOperation::Push)
            .await
            .map_err(registry_error("writing to the mirror", &mirror))?;
        let route = Route {
            from: &from,
            to: &to,
            source,
            mirror: &mirror,
            authorization: authorization(&mirror_auth, token),
        };

        let top = self.manifest(&from, &source_auth, source).await?;
        if let Some(expected) = source.digest() {
            if top.digest != expected {
                return Err(MirrorError::Digest {
                    reference: source.to_string(),
                    expected: expected.to_string(),
                    got: top.digest.clone(),
                });
            }
        }
        let reference = source.to_string();
        let selected = top.select(&reference, platforms)?;
        let (top_bytes, top_digest) = match selected.as_ref().and_then(|s| s.index.as_ref()) {
            Some(filtered) => (filtered.clone(), sha256_digest(filtered)),
            None => (top.bytes.clone(), top.digest.clone()),
        };

        let mut copied = Copied {
            source: source.clone(),
            mirror: mirror.clone(),
            source_digest: top.digest.clone(),
            mirror_digest: top_digest.clone(),
            already: false,
            blobs_copied: 0,
            blobs_skipped: 0,
            bytes_copied: 0,
            size_bytes: None,
            took: Duration::ZERO,
        };
        // The mirror serves this very manifest under the reference already: nothing to do.
        if self
            .client
            .fetch_manifest_digest(&to, &mirror_auth)
            .await
            .is_ok_and(|digest| digest == top_digest)
        {
            copied.already = true;
            // A single image's size is in the manifest at hand; an index's children are not
            // read again for it.
            if let Content::Image { .. } = top.content {
                copied.size_bytes =
                    Some(top.bytes.len() as u64 + top.blobs().iter().map(|b| b.size).sum::<u64>());
            }
            copied.took = started.elapsed();
            return Ok(copied);
        }

        let images = match selected {
            Some(selection) => {
                let mut images = Vec::new();
                for child in selection.children {
                    let child_ref = with_digest(&from, &child.digest);
                    let manifest = self.manifest(&child_ref, &source_auth, source).await?;
                    if manifest.digest != child.digest {
                        return Err(MirrorError::Digest {
                            reference: format!("{}@{}", source.name(), child.digest),
                            expected: child.digest.clone(),
                            got: manifest.digest,
                        });
                    }
                    images.push(manifest);
                }
                images
            }
            None => Vec::new(),
        };
        let single = matches!(top.content, Content::Image { .. });
        let mut size = top_bytes.len() as u64;
        for image in images.iter().chain(single.then_some(&top)) {
            size += image.blobs().iter().map(|b| b.size).sum::<u64>();
            if !single {
                size += image.bytes.len() as u64;
            }
            self.copy_blobs(image, &route, &mut copied).await?;
        }
        copied.size_bytes = Some(size);
        // Children by digest, then the top manifest under the reference (tag last).
        for image in &images {
            self.push_manifest(
                &with_digest(&to, &image.digest),
                &image.bytes,
                &image.media_type,
                &mirror,
            )
            .await?;
        }
        self.push_manifest(&to, &top_bytes, &top.media_type, &mirror)
            .await?;
        copied.took = started.elapsed();
        Ok(copied)
    }

    async fn manifest(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
        source: &ImageReference,
    ) -> Result<Manifest, MirrorError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, auth, &MANIFEST_TYPES)
            .await
            .map_err(registry_error("reading the manifest of", source))?;
        Ok(Manifest::parse(&source.to_string(), None, bytes.to_vec())?)
    }

    async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: &[u8],
        media_type: &str,
        mirror: &ImageReference,
    ) -> Result<(), MirrorError> {
        let content_type = media_type.parse().map_err(|_| MirrorError::Registry {
            what: "writing to the mirror",
            reference: mirror.to_string(),
            message: format!("media type {media_type:?} is not a header value"),
            transient: false,
        })?;
        self.client
            .push_manifest_raw(reference, bytes.to_vec(), content_type)
            .await
            .map_err(registry_error("writing a manifest of", mirror))?;
        Ok(())
    }

    /// Copies the blobs of one image manifest that the mirror lacks, some at once.
    async fn copy_blobs(
        &self,
        image: &Manifest,
        route: &Route<'_>,
        copied: &mut Copied,
    ) -> Result<(), MirrorError> {
        let bytes = Arc::new(AtomicU64::new(0));
        // Owned descriptors: a closure over borrowed ones makes the future not Send (the
        // controller runs copies on a multi-threaded runtime).
        let blobs: Vec<Descriptor> = image.blobs().into_iter().cloned().collect();
        let results: Vec<Result<bool, MirrorError>> = futures::stream::iter(blobs)
            .map(|blob: Descriptor| {
                let bytes = bytes.clone();
                async move { self.copy_blob(&blob, route, bytes).await }
            })
            .buffer_unordered(self.blob_concurrency)
            .collect()
            .await;
        for result in results {
            if result? {
                copied.blobs_copied += 1;
            } else {
                copied.blobs_skipped += 1;
            }
        }
        copied.bytes_copied += bytes.load(Ordering::Relaxed);
        Ok(())
    }

    /// Copies one blob unless the mirror has it: whether it was copied.
    async fn copy_blob(
        &self,
        blob: &Descriptor,
        route: &Route<'_>,
        bytes: Arc<AtomicU64>,
    ) -> Result<bool, MirrorError> {
        let Route {
            from,
            to,
            source,
            mirror,
            ..
        } = *route;
        if self
            .client
            .blob_exists(to, &blob.digest)
            .await
            .map_err(registry_error(
                "writing a blob of",
                format!("{mirror} ({})", blob.digest),
            ))?
        {
            return Ok(false);
        }
        let stream = self
            .client
            .pull_blob_stream(from, blob.digest.as_str())
            .await
            .map_err(registry_error(
                "reading a blob of",
                format!("{source} ({})", blob.digest),
            ))?;
        // A failure while reading the source (its bytes do not match the digest, the
        // connection dropped) ends the upload too; it is the one to report.
        let read_failure = Arc::new(std::sync::Mutex::new(None::<String>));
        let seen = read_failure.clone();
        let counted = verified(stream.stream, blob)
            .inspect_ok(move |chunk| {
                bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            })
            .inspect_err(move |error| {
                if let Ok(mut seen) = seen.lock() {
                    seen.get_or_insert_with(|| error.to_string());
                }
            });
        let uploaded = self.upload(to, blob, route, counted).await;
        let read = read_failure
            .lock()
            .ok()
            .and_then(|mut failure| failure.take());
        match (uploaded, read) {
            (_, Some(message)) => {
                return Err(MirrorError::Registry {
                    what: "reading a blob of",
                    reference: format!("{source} ({})", blob.digest),
                    message,
                    transient: true,
                });
            }
            (Err((message, transient)), None) => {
                return Err(MirrorError::Registry {
                    what: "writing a blob of",
                    reference: format!("{mirror} ({})", blob.digest),
                    message,
                    transient,
                });
            }
            (Ok(()), None) => {}
        }
        Ok(true)
    }

    /// Uploads one blob as the distribution API's monolithic upload: a POST opens it, one PUT
    /// streams the bytes and closes it with their digest (which the registry checks).
    async fn upload<S>(
        &self,
        to: &Reference,
        blob: &Descriptor,
        route: &Route<'_>,
        stream: S,
    ) -> Result<(), (String, bool)>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static,
    {
        let registry = to.resolve_registry();
        let scheme = self.scheme(registry);
        let start = format!(
            "{scheme}://{registry}/v2/{}/blobs/uploads/",
            to.repository()
        );
        let mut request = self
            .http
            .post(&start)
            .header(reqwest::header::CONTENT_LENGTH, 0);
        if let Some(value) = &route.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request.send().await.map_err(|e| (e.to_string(), true))?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            return Err(refusal("opening an upload", response).await);
        }
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                (
                    "the registry opened an upload without a Location".to_string(),
                    false,
                )
            })?;
        let mut url = reqwest::Url::parse(&start)
            .and_then(|base| base.join(location))
            .map_err(|e| (format!("the upload Location {location:?}: {e}"), false))?;
        url.query_pairs_mut().append_pair("digest", &blob.digest);
        let mut request = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, blob.size)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(Exclusive(
                std::sync::Mutex::new(stream),
            )));
        if let Some(value) = &route.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request.send().await.map_err(|e| (e.to_string(), true))?;
        if response.status() != reqwest::StatusCode::CREATED {
            return Err(refusal("uploading", response).await);
        }
        Ok(())
    }
}

/// A stream only ever polled through `&mut`, so `Sync` whatever it holds: reqwest asks a
/// request body for `Sync`, and oci-client's blob streams are only `Send`.
struct Exclusive<S>(std::sync::Mutex<S>);

impl<S: futures::Stream + Unpin> futures::Stream for Exclusive<S> {
    type Item = S::Item;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        let inner = self
            .get_mut()
            .0
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::pin::Pin::new(inner).poll_next(cx)
    }
}

/// `stream` checked against the blob's digest as it passes: the piece that completes the
/// blob's size is withheld and replaced by an error when the bytes do not match, so that the
/// upload ends before the mirror holds all of them (it would reject them too, but then the
/// mirror would seem to blame).
pub(super) fn verified<S>(
    stream: S,
    blob: &Descriptor,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static,
{
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut read = 0u64;
    let size = blob.size;
    let expected = blob.digest.clone();
    let checked = expected.starts_with("sha256:");
    stream.map(move |piece| {
        let piece = piece?;
        if checked {
            hasher.update(&piece);
            read += piece.len() as u64;
            if read >= size {
                let got = finished_digest(std::mem::take(&mut hasher));
                if got != expected || read > size {
                    return Err(std::io::Error::other(format!(
                        "the source served {read} bytes with digest {got} for a blob of {size} bytes with digest {expected}"
                    )));
                }
            }
        }
        Ok(piece)
    })
}

/// One image's way from its source to the mirror.
struct Route<'a> {
    from: &'a Reference,
    to: &'a Reference,
    source: &'a ImageReference,
    mirror: &'a ImageReference,
    /// The `Authorization` header of blob uploads to the mirror, if any.
    authorization: Option<String>,
}

/// The header for `auth`: the registry's token when it gave one (token auth), else the
/// credential itself.
pub(super) fn authorization(auth: &RegistryAuth, token: Option<String>) -> Option<String> {
    use base64::Engine as _;
    match (token, auth) {
        (Some(token), _) => Some(format!("Bearer {token}")),
        (None, RegistryAuth::Basic(user, password)) => Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )),
        (None, RegistryAuth::Bearer(token)) => Some(format!("Bearer {token}")),
        (None, RegistryAuth::Anonymous) => None,
    }
}

/// What a registry said when it refused a request (the status and the first error's message),
/// and whether trying again may help.
async fn refusal(doing: &str, response: reqwest::Response) -> (String, bool) {
    let status = response.status();
    let transient = status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
    let body = response.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect());
    (
        format!("{doing}: {status} {detail}").trim_end().to_string(),
        transient,
    )
}

/// The certificates of a PEM bundle, each as its own PEM block. An empty bundle is no
/// certificate; a bundle with text but no certificate is an error.
fn pem_certificates(bundle: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    const END: &str = "-----END CERTIFICATE-----";
    let text = std::str::from_utf8(bundle)
        .map_err(|_| anyhow::anyhow!("the registry CA bundle is not PEM text"))?;
    let mut certificates = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            anyhow::bail!("the registry CA bundle has a certificate without its END line");
        };
        let end = start + end + END.len();
        certificates.push(format!("{}\n", &rest[start..end]).into_bytes());
        rest = &rest[end..];
    }
    if certificates.is_empty() && !text.trim().is_empty() {
        anyhow::bail!("the registry CA bundle holds no PEM certificate");
    }
    Ok(certificates)
}

/// An error with its sources, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}
