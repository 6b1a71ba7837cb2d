//! A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-scheduler and
//! kube-controller-manager, built by `scripts/control-plane.sh` (the directory of the binaries
//! in `CORAL_CONTROL_PLANE_BIN`), started on free loopback ports in a temp directory, and
//! stopped and waited for when dropped, also when the test fails.
//!
//! The API server authenticates client certificates and service-account tokens, authorizes
//! with Node and RBAC, and runs the default admission plugins plus NodeRestriction, as a
//! kubeadm cluster has them. Nodes are API objects ([`ControlPlane::node`]), which the scheduler
//! binds Pods to, and the node lifecycle controller is off, so nothing taints them for missing
//! heartbeats; a control plane started [`with real nodes`](ControlPlane::start_for_nodes) runs
//! it, and its kubelets (`tests/support/node.rs`) register and heartbeat for themselves.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use serde_json::{Value, json};

/// Where `scripts/control-plane.sh` put the binaries, when it ran.
pub const BIN_ENV: &str = "CORAL_CONTROL_PLANE_BIN";

/// The API server's address for Pods, in a control plane with kubelets: on loopback of the
/// tests' own network namespace, routed to from the pod networks (`tests/support/node.rs`).
pub const POD_REACHABLE_ADDRESS: &str = "10.210.0.1";

/// A component of the control plane, with what it was started with.
struct Component {
    name: &'static str,
    /// `None` while killed.
    child: Option<Child>,
    command: PathBuf,
    args: Vec<String>,
}

pub struct ControlPlane {
    /// Started components, stopped in reverse order.
    processes: Vec<Component>,
    dir: tempfile::TempDir,
    /// The cluster's certificate authority: it signs the kubelets' client certificates.
    ca: CertifiedIssuer<'static, KeyPair>,
    pub url: String,
    /// The API server's port.
    pub port: u16,
    /// An admin (system:masters) kubeconfig.
    pub kubeconfig: PathBuf,
    pub startup: Duration,
}

/// `N` distinct free ports: each listener is held until all are chosen, so none comes twice.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// A client certificate and key signed by `ca`.
fn client_cert(
    ca: &CertifiedIssuer<'static, KeyPair>,
    user: &str,
    groups: &[&str],
) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, user);
    for group in groups {
        name.push(DnType::OrganizationName, *group);
    }
    params.distinguished_name = name;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_kubeconfig(path: &Path, url: &str, ca: &str, user: Value) {
    use base64::Engine as _;
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
    });
    std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
}

fn cert_user(cert: &str, key: &str) -> Value {
    use base64::Engine as _;
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    json!({"client-certificate-data": b64(cert), "client-key-data": b64(key)})
}

impl ControlPlane {
    /// The directory of the binaries, or `None` when the control plane was not built.
    pub fn binaries() -> Option<PathBuf> {
        std::env::var_os(BIN_ENV)
            .filter(|bin| !bin.is_empty())
            .map(PathBuf::from)
    }

    /// Starts etcd, kube-apiserver, kube-scheduler and kube-controller-manager and waits until
    /// the API server is ready.
    pub fn start(bin: &Path) -> Self {
        Self::start_with(bin, false)
    }

    /// The same for a cluster with kubelets: the node lifecycle controller runs (it lifts the
    /// not-ready taint of a Node whose kubelet reports Ready, as in any cluster).
    pub fn start_for_nodes(bin: &Path) -> Self {
        Self::start_with(bin, true)
    }

    fn start_with(bin: &Path, kubelets: bool) -> Self {
        if kubelets {
            assert_isolated();
        }
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let write = |name: &str, text: &str| std::fs::write(path(name), text).unwrap();

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "coral-test-ca");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        write("ca.crt", &ca.pem());
        let serving_key = KeyPair::generate().unwrap();
        let serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            POD_REACHABLE_ADDRESS.to_string(),
            "localhost".to_string(),
            "kubernetes.default.svc".to_string(),
        ])
        .unwrap()
        .signed_by(&serving_key, &ca)
        .unwrap();
        write("apiserver.crt", &serving.pem());
        write("apiserver.key", &serving_key.serialize_pem());
        let service_accounts = KeyPair::generate().unwrap();
        write("sa.key", &service_accounts.serialize_pem());
        write("sa.pub", &service_accounts.public_key_pem());

        let [etcd_client, etcd_peer, api_port] = free_ports();
        let url = format!("https://127.0.0.1:{api_port}");
        // The API server's client of the kubelets (logs, exec, the node proxy).
        let (cert, key) = client_cert(&ca, "kube-apiserver-kubelet-client", &["system:masters"]);
        write("kubelet-client.crt", &cert);
        write("kubelet-client.key", &key);
        let mut plane = Self {
            processes: Vec::new(),
            url: url.clone(),
            port: api_port,
            kubeconfig: path("admin.kubeconfig"),
            startup: Duration::ZERO,
            dir,
            ca,
        };
        let (cert, key) = client_cert(&plane.ca, "coral-test-admin", &["system:masters"]);
        let ca_pem = plane.ca.pem();
        write_kubeconfig(&plane.kubeconfig, &url, &ca_pem, cert_user(&cert, &key));
        for (name, user) in [
            ("scheduler", "system:kube-scheduler"),
            ("controller-manager", "system:kube-controller-manager"),
        ] {
            let (cert, key) = client_cert(&plane.ca, user, &[]);
            write_kubeconfig(
                &plane.dir.path().join(format!("{name}.kubeconfig")),
                &url,
                &ca_pem,
                cert_user(&cert, &key),
            );
        }

        let dir = plane.dir.path().to_path_buf();
        let arg = |name: &str| dir.join(name).display().to_string();
        plane.spawn(
            "etcd",
            bin,
            &[
                "--data-dir".into(),
                arg("etcd"),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{etcd_client}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{etcd_client}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{etcd_peer}"),
                "--initial-cluster".into(),
                format!("default=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync".into(),
            ],
        );
        // With kubelets, Pods reach the API server too: it listens on every address of the
        // tests' own network namespace and advertises one the Pods have a route to, and it
        // calls webhooks at their Service's endpoints (no kube-proxy routes Service IPs).
        let (bind, advertise) = if kubelets {
            let output = Command::new("ip")
                .args([
                    "addr",
                    "replace",
                    &format!("{POD_REACHABLE_ADDRESS}/32"),
                    "dev",
                    "lo",
                ])
                .output()
                .expect("ip runs");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            ("0.0.0.0", POD_REACHABLE_ADDRESS)
        } else {
            ("127.0.0.1", "127.0.0.1")
        };
        plane.spawn(
            "kube-apiserver",
            bin,
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                format!("--secure-port={api_port}"),
                format!("--bind-address={bind}"),
                format!("--advertise-address={advertise}"),
                format!("--enable-aggregator-routing={kubelets}"),
                format!("--tls-cert-file={}", arg("apiserver.crt")),
                format!("--tls-private-key-file={}", arg("apiserver.key")),
                format!("--client-ca-file={}", arg("ca.crt")),
                format!("--service-account-key-file={}", arg("sa.pub")),
                format!("--service-account-signing-key-file={}", arg("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                format!("--cert-dir={}", arg("certs")),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                format!("--kubelet-client-certificate={}", arg("kubelet-client.crt")),
                format!("--kubelet-client-key={}", arg("kubelet-client.key")),
                "--kubelet-preferred-address-types=InternalIP".into(),
            ],
        );
        plane.wait_ready(Duration::from_secs(60));
        plane.spawn(
            "kube-scheduler",
            bin,
            &[
                format!("--kubeconfig={}", arg("scheduler.kubeconfig")),
                format!(
                    "--authentication-kubeconfig={}",
                    arg("scheduler.kubeconfig")
                ),
                format!("--authorization-kubeconfig={}", arg("scheduler.kubeconfig")),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
            ],
        );
        plane.spawn(
            "kube-controller-manager",
            bin,
            &[
                format!("--kubeconfig={}", arg("controller-manager.kubeconfig")),
                format!(
                    "--authentication-kubeconfig={}",
                    arg("controller-manager.kubeconfig")
                ),
                format!(
                    "--authorization-kubeconfig={}",
                    arg("controller-manager.kubeconfig")
                ),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                format!("--service-account-private-key-file={}", arg("sa.key")),
                format!("--root-ca-file={}", arg("ca.crt")),
                "--use-service-account-credentials=true".into(),
                // Without kubelets nothing would renew node leases; no cloud, routes or
                // service IPs to manage.
                if kubelets {
                    "--controllers=*,-nodeipam,-route,-cloud-node-lifecycle,-service".into()
                } else {
                    "--controllers=*,-nodelifecycle,-nodeipam,-route,-cloud-node-lifecycle,-service"
                        .into()
                },
            ],
        );
        plane.startup = started.elapsed();
        println!(
            "control plane ready in {:.1} s",
            plane.startup.as_secs_f64()
        );
        plane
    }

    fn spawn(&mut self, name: &'static str, bin: &Path, args: &[String]) {
        let mut component = Component {
            name,
            child: None,
            command: bin.join(name),
            args: args.to_vec(),
        };
        self.run(&mut component);
        self.processes.push(component);
    }

    fn run(&self, component: &mut Component) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", component.name)))
            .unwrap();
        let child = Command::new(&component.command)
            .args(&component.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", component.name));
        component.child = Some(child);
    }

    /// Kills one component (`etcd`, `kube-apiserver`, …) without warning, as a crash would,
    /// and waits for it.
    pub fn kill(&mut self, name: &str) {
        let at = self.position(name);
        stop(self.processes[at].child.take());
    }

    fn position(&self, name: &str) -> usize {
        self.processes
            .iter()
            .position(|c| c.name == name)
            .unwrap_or_else(|| panic!("no component {name}"))
    }

    /// Starts a killed component again with its arguments; the API server is waited for
    /// until it is ready.
    pub fn start_again(&mut self, name: &str) {
        let at = self.position(name);
        let mut component = self.processes.remove(at);
        assert!(component.child.is_none(), "{name} is running");
        self.run(&mut component);
        self.processes.insert(at, component);
        if name == "kube-apiserver" {
            self.wait_ready(Duration::from_secs(60));
        }
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let output = self.kubectl(&["get", "--raw", "/readyz"]);
            if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "ok" {
                return;
            }
            let exited = self.processes.iter_mut().find_map(|component| {
                let status = component.child.as_mut()?.try_wait().ok()??;
                Some((component.name, status))
            });
            if let Some((name, status)) = exited {
                panic!("{name} exited ({status}):\n{}", self.log(name));
            }
            assert!(
                Instant::now() < deadline,
                "the API server is not ready:\n{}",
                self.log("kube-apiserver")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The end of a component's log.
    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// kubectl as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// kubectl as the admin, which must succeed; its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        assert!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// kubectl as the admin with an object on stdin (`apply`, `create`).
    pub fn kubectl_stdin(&self, args: &[&str], object: &Value) -> Output {
        use std::io::Write as _;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(object.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// A kubeconfig for the kubelet of `node`: a client certificate for `system:node:<node>` in
    /// `system:nodes`, so that the Node authorizer and NodeRestriction judge it as in a real
    /// cluster.
    pub fn node_kubeconfig(&self, node: &str) -> PathBuf {
        let (cert, key) = client_cert(&self.ca, &format!("system:node:{node}"), &["system:nodes"]);
        let path = self.dir.path().join(format!("kubelet-{node}.kubeconfig"));
        write_kubeconfig(&path, &self.url, &self.ca.pem(), cert_user(&cert, &key));
        path
    }

    /// The cluster CA's certificate file (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A kubeconfig for a ServiceAccount, with a token from the TokenRequest API.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let token = self.kubectl_ok(&["create", "token", name, "-n", namespace, "--duration=1h"]);
        self.service_account_kubeconfig_with_token(token.trim(), &format!("{namespace}-{name}"))
    }

    /// A kubeconfig for a token minted by the caller (bound to a Pod, say), named `name`.
    pub fn service_account_kubeconfig_with_token(&self, token: &str, name: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let ca = std::fs::read_to_string(self.dir.path().join("ca.crt")).unwrap();
        write_kubeconfig(&path, &self.url, &ca, json!({"token": token}));
        path
    }

    /// Creates a Node as a kubelet would register it, Ready, with these labels, taints and
    /// cordon, and room for pods.
    pub fn node(&self, name: &str, labels: Value, taints: Value, unschedulable: bool) {
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
        let output = self.kubectl_stdin(&["create"], &node);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let resources = json!({"cpu": "8", "memory": "32Gi", "pods": "110"});
        let status = json!({"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ready"}],
        }});
        self.kubectl_ok(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
        // The API server taints a new Node not-ready; with no node lifecycle controller to
        // lift it, the test sets the taints it wants.
        let spec = json!({"spec": {"taints": taints, "unschedulable": unschedulable}});
        self.kubectl_ok(&[
            "patch",
            "node",
            name,
            "--type=merge",
            "-p",
            &spec.to_string(),
        ]);
    }
}

/// The network interfaces of this process's network namespace (from `/proc/net/dev`, which
/// is per namespace; `/sys/class/net` shows the namespace that mounted `/sys`).
pub fn interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/self/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|line| Some(line.split_once(':')?.0.trim().to_string()))
        .collect()
}

/// Whether an interface is one a node made: its veth or bridge (`cn…`), or a pod's end of a
/// veth the CNI bridge plugin made (`veth…`).
fn ours(interface: &str) -> bool {
    interface == "lo" || interface.starts_with("cn") || interface.starts_with("veth")
}

/// Panics unless this is a network namespace holding only loopback and node interfaces.
pub fn assert_isolated() {
    let foreign: Vec<String> = interfaces().into_iter().filter(|i| !ours(i)).collect();
    assert!(
        foreign.is_empty(),
        "real nodes run only in a network namespace of their own, where nothing routes off the \
         machine; this one has {foreign:?}. Run the tests as scripts/test.sh does: \
         unshare --net sh -c 'ip link set lo up && exec cargo test --test control_plane -- --ignored'"
    );
    let loopback = Command::new("ip")
        .args(["-o", "link", "show", "lo"])
        .output()
        .expect("ip runs");
    assert!(
        String::from_utf8_lossy(&loopback.stdout).contains(",UP"),
        "loopback is down in this network namespace: ip link set lo up"
    );
}

/// Kills a process, if there is one, and waits for it.
fn stop(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(component) = self.processes.pop() {
            stop(component.child);
        }
    }
}
