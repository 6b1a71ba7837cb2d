//! Shared by the webhook tests and the load benchmark: certificates made on the spot, the real
//! `coral webhook --standalone` on free ports, and a small HTTPS/1.1 client.
#![allow(clippy::expect_used, clippy::unwrap_used, dead_code)] // helpers panic on setup failures

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod api_server;
pub mod control_plane;
pub mod helm;
pub mod process;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A certificate authority made for one test.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes a serving certificate for localhost and 127.0.0.1, and its key.
    pub fn issue(&self, cert: &Path, key: &Path) {
        self.issue_until(cert, key, None);
    }

    /// The same, expiring at midnight (UTC) of `(year, month, day)` when given.
    pub fn issue_until(&self, cert: &Path, key: &Path, not_after: Option<(i32, u8, u8)>) {
        let key_pair = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        if let Some((year, month, day)) = not_after {
            params.not_after = rcgen::date_time_ymd(year, month, day);
        }
        let certificate = params.signed_by(&key_pair, &self.issuer).unwrap();
        // Write the key first: the server reloads when either file changes, and must see a
        // matching pair once both are written.
        std::fs::write(key, key_pair.serialize_pem()).unwrap();
        std::fs::write(cert, certificate.pem()).unwrap();
    }
}

/// The environment `deploy/base/webhook.yaml` gives the webhook: mimalloc returns pages it
/// no longer uses to the system at once, not after a delay, and uses no transparent huge
/// pages.
pub const DEPLOYED_ENV: [(&str, &str); 2] =
    [("MIMALLOC_PURGE_DELAY", "0"), ("MIMALLOC_ALLOW_THP", "0")];

/// A running webhook; killed and waited for when dropped, even when the test fails.
pub struct Webhook {
    pub child: Child,
    pub https: SocketAddr,
    pub probes: SocketAddr,
    pub dir: tempfile::TempDir,
    pub authority: Authority,
    /// Its log lines after the addresses, as they come.
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Webhook {
    /// Starts `coral webhook --standalone` on free ports with this state and extra flags,
    /// and waits until it is ready.
    pub fn start(state: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.yaml"), state).unwrap();
        let mut args: Vec<std::ffi::OsString> = vec!["--standalone".into(), "--state".into()];
        args.push(dir.path().join("state.yaml").into());
        Self::spawn(dir, args, extra, &[])
    }

    /// Starts the webhook in cluster mode against the API server at `server` (a kubeconfig
    /// is written for it).
    pub fn start_in_cluster(server: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api_server::kubeconfig_for(server)).unwrap();
        let kubeconfig = kubeconfig.into_os_string();
        Self::spawn(
            dir,
            Vec::new(),
            extra,
            &[
                ("KUBECONFIG", kubeconfig),
                ("KUBERNETES_SERVICE_HOST", "".into()),
            ],
        )
    }

    /// Starts the webhook in cluster mode with this kubeconfig.
    pub fn start_with_kubeconfig(kubeconfig: &Path, extra: &[&str]) -> Self {
        Self::spawn(
            tempfile::tempdir().unwrap(),
            Vec::new(),
            extra,
            &[
                ("KUBECONFIG", kubeconfig.as_os_str().to_os_string()),
                ("KUBERNETES_SERVICE_HOST", "".into()),
            ],
        )
    }

    fn spawn(
        dir: tempfile::TempDir,
        mode: Vec<std::ffi::OsString>,
        extra: &[&str],
        env: &[(&str, std::ffi::OsString)],
    ) -> Self {
        let authority = Authority::new();
        authority.issue(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_coral"))
            .args(["webhook", "--listen", "127.0.0.1:0", "--probe-listen"])
            .arg("127.0.0.1:0")
            .args(mode)
            .arg("--tls-cert")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.path().join("tls.key"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["--poll-interval-ms", "100", "--request-timeout-ms", "1000"])
            .args(extra)
            .env("CORAL_LOG", "info")
            .envs(DEPLOYED_ENV)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("coral webhook starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut https, mut probes) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(120);
        while https.is_none() || probes.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("webhook logs its addresses");
            let address = || -> SocketAddr {
                line.rsplit("address=")
                    .next()
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            };
            if line.contains("admission server listening") {
                https = Some(address());
            } else if line.contains("probe server listening") {
                probes = Some(address());
            }
        }
        // Keep draining the log so the server never blocks on a full pipe.
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            while let Ok(line) = rx.recv() {
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            https: https.unwrap(),
            probes: probes.unwrap(),
            dir,
            authority,
            log,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn connector(ca_pem: &str) -> TlsConnector {
    connector_for_versions(ca_pem, rustls::DEFAULT_VERSIONS)
}

/// A client that trusts `ca_pem` and speaks only these TLS versions.
pub fn connector_for_versions(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

pub async fn tls_stream(
    address: SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    connector(ca_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

pub fn request_bytes(path: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one HTTP/1.1 response with a Content-Length body.
pub async fn read_response<S: AsyncReadExt + Unpin>(stream: &mut S) -> (u16, String) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-body");
                buffer.extend_from_slice(&chunk[..n]);
            }
            let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            let body = String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]).to_string();
            return (status, body);
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

pub async fn post(webhook: &Webhook, path: &str, body: &[u8]) -> (u16, String) {
    let mut stream = tls_stream(webhook.https, &webhook.authority.pem())
        .await
        .expect("TLS connection");
    stream
        .write_all(&request_bytes(path, body, false))
        .await
        .unwrap();
    read_response(&mut stream).await
}

pub async fn get_probe(webhook: &Webhook, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(webhook.probes).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    read_response(&mut stream).await
}

/// Every overlay directory of `deploy/overlays`, as `deploy/overlays/NAME`, sorted.
#[allow(dead_code)] // each test crate uses part of the support module
pub fn overlays() -> Vec<String> {
    let mut overlays: Vec<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/overlays"))
            .unwrap()
            .map(|entry| {
                format!(
                    "deploy/overlays/{}",
                    entry.unwrap().file_name().to_string_lossy()
                )
            })
            .collect();
    overlays.sort();
    overlays
}
