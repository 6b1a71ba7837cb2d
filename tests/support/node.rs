//! Real nodes for the control-plane tests: a kubelet (built with the control plane by
//! `scripts/control-plane.sh`) and a containerd of its own per node, with the machine's runc
//! and CNI plugins, registering itself with the test's API server under a client certificate
//! for `system:node:<name>`.
//!
//! **Network.** The kubelet refuses a loopback node address, so every node gets a veth pair
//! holding its address (`10.211.N.1`) and a bridge for its pods (`10.212.N.0/24`, CNI `bridge`
//! and `host-local`). These tests run in a network namespace of their own (`scripts/test.sh`
//! starts them under `unshare --net`): [`Node::start`] refuses to run where any interface
//! other than loopback and the ones it made exists, so no packet can leave the machine, by
//! construction. Services are not routed (no kube-proxy): a Pod is reached at its address.
//!
//! **Cgroups.** The kernel has cgroup v1 hierarchies and a cgroup2 `unified` mount; the kubelet
//! runs with `failCgroupV1: false`, the `cgroupfs` driver, and a `cgroupRoot` of its own made
//! beforehand in every hierarchy.
//!
//! **Mounts.** Each node's containerd and kubelet share a mount namespace of their own, with a
//! private `/run` where containerd listens on `/run/containerd/containerd.sock`, so that a
//! hostPath of `/run/containerd`, as Coral's agent DaemonSet has it, reaches the node's own
//! runtime; what they mount for pods stays in that namespace.
//!
//! **Cleanup.** Dropping a node kills its kubelet, stops and removes its pods through the CRI,
//! stops containerd and kills its shims and their processes, ends its mount namespace (and so
//! its mounts), unmounts what is still mounted under its directory, removes its cgroups, its
//! veth and bridge and the kubelet's log links. A node
//! whose cleanup failed leaves its name behind (in a cgroup, a mount, an interface); the next
//! node refuses to start, naming it, so a leak fails the next run loudly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::runtime::Containerd;
use crate::support::control_plane::{ControlPlane, interfaces};

/// What every node's directory, cgroup root and interfaces are named after.
const PREFIX: &str = "coral-node-";
/// The v1 hierarchies and the cgroup2 mount a node's cgroups live in.
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// Where the kubelet links container logs, a path it does not let one configure.
const CONTAINER_LOG_LINKS: &str = "/var/log/containers";

static NEXT: AtomicU32 = AtomicU32::new(1);
/// The names of the nodes alive in this process (their directories, cgroups, interfaces):
/// what [`leftovers`] does not count.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A real node: a kubelet and its containerd.
pub struct Node {
    pub name: String,
    /// The node's address (InternalIP).
    pub ip: String,
    pub containerd: Containerd,
    kubelet: Option<Child>,
    kubelet_command: Option<PathBuf>,
    kubelet_args: Vec<String>,
    /// The node's own directory (kubelet root, logs, configuration); containerd has its own.
    dir: PathBuf,
    /// The cgroup path of the node (the kubelet's `cgroupRoot`).
    cgroup_root: String,
    veth: String,
    bridge: String,
    /// Whether Drop has anything to undo.
    live: bool,
    _tempdir: tempfile::TempDir,
}

/// The settings of one node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Labels the kubelet registers the Node with (`--node-labels`).
    pub labels: Vec<(String, String)>,
    /// Extra KubeletConfiguration fields, merged over the defaults.
    pub config: Value,
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Everything an earlier node left behind: cgroups, mounts, interfaces, processes named after
/// a node.
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for hierarchy in std::fs::read_dir(CGROUP_MOUNT)
        .into_iter()
        .flatten()
        .flatten()
    {
        for entry in std::fs::read_dir(hierarchy.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                found.push(format!("cgroup {}", entry.path().display()));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        if let Some(point) = line.split(' ').nth(4)
            && point.contains(PREFIX)
        {
            found.push(format!("mount {point}"));
        }
    }
    for entry in std::fs::read_dir(CONTAINER_LOG_LINKS)
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(entry.path())
            && target.to_string_lossy().contains(PREFIX)
        {
            found.push(format!(
                "log link {} -> {}",
                entry.path().display(),
                target.display()
            ));
        }
    }
    for interface in interfaces() {
        if interface.starts_with("cn") {
            found.push(format!("interface {interface}"));
        }
    }
    for (pid, cmdline) in processes() {
        if cmdline.contains(PREFIX) {
            found.push(format!("process {pid}: {cmdline}"));
        }
    }
    let live = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    found.retain(|thing| {
        !live.iter().any(|name| {
            thing.strip_prefix("interface ").map_or_else(
                || thing.contains(name.as_str()),
                |interface| interface.strip_suffix('p').unwrap_or(interface) == name,
            )
        })
    });
    found
}

/// `(pid, command line)` of every process.
fn processes() -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .collect()
}

impl Node {
    /// Starts a real node named `name` for `plane` (started with
    /// [`ControlPlane::start_for_nodes`]), whose pod sandboxes run `sandbox_image` (pulled
    /// before the kubelet starts), and waits until its Node is Ready.
    pub fn start(
        plane: &ControlPlane,
        bin: &Path,
        name: &str,
        sandbox_image: &str,
        options: &NodeOptions,
    ) -> Self {
        crate::support::control_plane::assert_isolated();
        let left = leftovers();
        assert!(
            left.is_empty(),
            "an earlier node left these behind (its cleanup failed; remove them by hand):\n{}",
            left.join("\n")
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(n < 250, "too many nodes in one run");
        let tempdir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{name}-"))
            .tempdir()
            .unwrap();
        let dir = tempdir.path().to_path_buf();
        let id = dir.file_name().unwrap().to_string_lossy().into_owned();
        let ip = format!("10.211.{n}.1");
        let veth = format!("cn{n}");
        let bridge = format!("cnb{n}");
        let cgroup_root = format!("/{id}");
        let containerd_dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}ctd-{n}-"))
            .tempdir()
            .unwrap();
        LIVE.lock().unwrap().extend([
            id.clone(),
            containerd_dir.path().display().to_string(),
            veth.clone(),
            format!("cnb{n}"),
        ]);
        let mut node = Self {
            name: name.to_string(),
            ip: ip.clone(),
            containerd: Containerd::start_for_node(
                containerd_dir,
                sandbox_image,
                &conflist(&bridge, n),
            ),
            kubelet: None,
            kubelet_command: None,
            kubelet_args: Vec::new(),
            dir: dir.clone(),
            cgroup_root: cgroup_root.clone(),
            veth: veth.clone(),
            bridge,
            live: false,
            _tempdir: tempdir,
        };
        // From here on, Drop undoes what was made, also when a step below fails.
        node.live = true;
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{veth}p"),
            ],
        );
        run_ok("ip", &["addr", "add", &format!("{ip}/24"), "dev", &veth]);
        run_ok("ip", &["link", "set", &veth, "up"]);
        run_ok("ip", &["link", "set", &format!("{veth}p"), "up"]);
        node.make_cgroups();
        node.pull_sandbox(sandbox_image);

        let write = |file: &str, text: &str| std::fs::write(dir.join(file), text).unwrap();
        write("resolv.conf", "");
        let mut config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // cgroup v1 hierarchies with a cgroup2 `unified` mount.
            "failCgroupV1": false,
            "failSwapOn": false,
            // containerd 1.6 does not answer RuntimeConfig; its runc uses cgroupfs.
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": cgroup_root,
            "cgroupsPerQOS": true,
            "enforceNodeAllocatable": [],
            // The kubelet runs in its containerd's mount namespace.
            "containerRuntimeEndpoint": format!("unix://{}", crate::runtime::NODE_SOCKET),
            "address": ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 0,
            "podLogsDir": dir.join("pods-logs").display().to_string(),
            "resolvConf": dir.join("resolv.conf").display().to_string(),
            "clusterDomain": "cluster.local",
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": plane.ca_file().display().to_string()},
            },
            "authorization": {"mode": "Webhook"},
            "registerNode": true,
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "serializeImagePulls": false,
            // The machine's disk is shared: no eviction for what the tests use of it.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 50,
            "shutdownGracePeriod": "0s",
            "volumePluginDir": dir.join("volume-plugins").display().to_string(),
        });
        merge(&mut config, &options.config);
        write("kubelet.yaml", &serde_yaml::to_string(&config).unwrap());
        let labels: Vec<String> = options
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let arg = |file: &str| dir.join(file).display().to_string();
        node.kubelet_args = vec![
            format!("--config={}", arg("kubelet.yaml")),
            format!("--kubeconfig={}", plane.node_kubeconfig(name).display()),
            format!("--root-dir={}", arg("kubelet")),
            format!("--cert-dir={}", arg("pki")),
            format!("--hostname-override={name}"),
            format!("--node-ip={ip}"),
            format!("--node-labels={}", labels.join(",")),
            "--v=2".to_string(),
        ];
        node.kubelet_command = Some(bin.join("kubelet"));
        node.start_kubelet();
        node.wait_ready(plane);
        node
    }
}

/// Merges `extra` into `base`, object by object.
fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (key, value) in extra {
                merge(base.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (base, extra) if !extra.is_null() => *base = extra.clone(),
        _ => {}
    }
}

/// The CNI configuration of node `n`: a bridge of its own, addresses from its own range, no
/// route or masquerading beyond the namespace.
fn conflist(bridge: &str, n: u32) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "coral-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("10.212.{n}.0/24")}]],
                    // Pods reach each other, the nodes and the API server; nothing else has
                    // a route.
                    "routes": [
                        {"dst": "10.212.0.0/16"},
                        {"dst": "10.211.0.0/16"},
                        {"dst": format!("{}/32", crate::support::control_plane::POD_REACHABLE_ADDRESS)},
                    ],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
    .to_string()
}

/// Runs a future on a runtime of its own (the tests are synchronous).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

impl Node {
    /// The node's cgroup directory in every hierarchy (v1 and the cgroup2 mount).
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(CGROUP_MOUNT)
            .unwrap()
            .flatten()
            .filter(|entry| entry.path().is_dir() && !entry.path().is_symlink())
            .map(|entry| entry.path().join(self.cgroup_root.trim_start_matches('/')))
            .collect();
        dirs.sort();
        dirs
    }

    /// Makes the `cgroupRoot` in every hierarchy; cpuset's needs its CPUs and memory nodes
    /// before a process can join it.
    fn make_cgroups(&self) {
        for dir in self.cgroup_dirs() {
            std::fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("cannot make the cgroup {}: {e}", dir.display()));
            let parent = dir.parent().unwrap();
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(parent.join(file)) {
                    std::fs::write(dir.join(file), value.trim()).unwrap();
                }
            }
        }
    }

    /// Pulls the pause image before the kubelet asks for a sandbox.
    fn pull_sandbox(&self, image: &str) {
        let (ok, text) = self.containerd.prefetch(&[image.to_string()], &[]);
        assert!(ok, "the sandbox image {image} cannot be pulled: {text}");
    }

    fn start_kubelet(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kubelet.log"))
            .unwrap();
        // In its containerd's mount namespace, as on a real node: what it mounts for pods
        // (volumes, the service-account token) is what their containers get.
        let namespace = self
            .containerd
            .mount_namespace()
            .expect("a node's containerd");
        let child = Command::new("nsenter")
            .arg(format!("--mount={}", namespace.display()))
            .arg("--")
            .arg(self.kubelet_command.as_ref().unwrap())
            .args(&self.kubelet_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the kubelet starts");
        self.kubelet = Some(child);
    }

    /// The end of the kubelet's log.
    pub fn kubelet_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("kubelet.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Waits until the Node is Ready and schedulable (its not-ready taint lifted); panics with
    /// the kubelet's log when it exits or the Node stays not ready.
    pub fn wait_ready(&mut self, plane: &ControlPlane) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let node: Value = serde_json::from_slice(
                &plane
                    .kubectl(&["get", "node", &self.name, "-o", "json"])
                    .stdout,
            )
            .unwrap_or(Value::Null);
            let ready = node["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let tainted = node["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["key"] == "node.kubernetes.io/not-ready");
            if ready && !tainted {
                return;
            }
            if let Some(status) = self
                .kubelet
                .as_mut()
                .and_then(|k| k.try_wait().ok().flatten())
            {
                panic!(
                    "the kubelet of {} exited ({status}):\n{}",
                    self.name,
                    self.kubelet_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "node {} is not Ready: {}\n{}",
                self.name,
                node["status"]["conditions"],
                self.kubelet_log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Kills the kubelet without warning, as a crash would (its pods keep running).
    pub fn kill_kubelet(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            let _ = kubelet.kill();
            let _ = kubelet.wait();
        }
    }

    /// Starts the kubelet again with its arguments and waits until the Node is Ready.
    pub fn restart_kubelet(&mut self, plane: &ControlPlane) {
        assert!(self.kubelet.is_none(), "the kubelet of {} runs", self.name);
        self.start_kubelet();
        self.wait_ready(plane);
    }

    /// Stops and removes every pod sandbox through the CRI (which stops their containers and
    /// tears their network down).
    fn remove_pods(&self) {
        use k8s_cri::v1::{ListPodSandboxRequest, RemovePodSandboxRequest, StopPodSandboxRequest};
        let address = self.containerd.address();
        let result = block_on(async {
            let cri = coral::agent::cri::Cri::new(&address).map_err(|e| e.to_string())?;
            let mut runtime = cri.runtime_service();
            let call = Duration::from_secs(30);
            let sandboxes = tokio::time::timeout(
                call,
                runtime.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
            )
            .await
            .map_err(|_| "ListPodSandbox timed out".to_string())?
            .map_err(|e| e.to_string())?
            .into_inner()
            .items;
            for sandbox in sandboxes {
                let id = sandbox.id;
                let _ = tokio::time::timeout(
                    call,
                    runtime.stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    }),
                )
                .await;
                let _ = tokio::time::timeout(
                    call,
                    runtime.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }),
                )
                .await;
            }
            Ok::<(), String>(())
        });
        if let Err(error) = result {
            eprintln!(
                "node {}: cannot remove its pods through the CRI: {error}",
                self.name
            );
        }
    }

    /// Kills every process left in the node's cgroups and waits until they are gone.
    fn kill_cgroup_processes(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut pids = Vec::new();
            for dir in self.cgroup_dirs() {
                for cgroup in walk(&dir) {
                    let procs =
                        std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
                    pids.extend(procs.lines().filter_map(|p| p.trim().parse::<u32>().ok()));
                }
            }
            pids.sort_unstable();
            pids.dedup();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Unmounts what is mounted under the node's and its containerd's directories, the
    /// deepest first.
    fn unmount(&self) {
        let ours = [
            self.dir.display().to_string(),
            self.containerd.dir.path().display().to_string(),
        ];
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| ours.iter().any(|dir| point.starts_with(dir.as_str())))
            .map(str::to_string)
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").args(["-l", &point]).status();
        }
    }

    /// Removes the node's cgroups, the deepest first; a cgroup its last process just left may
    /// stay busy a moment.
    fn remove_cgroups(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in self.cgroup_dirs() {
            let mut cgroups = walk(&dir);
            cgroups.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for cgroup in cgroups {
                while let Err(error) = std::fs::remove_dir(&cgroup) {
                    if error.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Removes the node's interfaces: the pods' veths on its bridge, the bridge, its veth.
    fn remove_interfaces(&self) {
        let attached = run("ip", &["-o", "link", "show", "master", &self.bridge]);
        for line in String::from_utf8_lossy(&attached.stdout).lines() {
            if let Some(name) = line.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or(name);
                let _ = run("ip", &["link", "del", name]);
            }
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
        let _ = run("ip", &["link", "del", &self.veth]);
    }

    /// Removes the kubelet's links to this node's container logs.
    fn remove_log_links(&self) {
        for entry in std::fs::read_dir(CONTAINER_LOG_LINKS)
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_link(entry.path()).is_ok_and(|target| target.starts_with(&self.dir)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// A cgroup directory and every cgroup below it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if !dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
        found.push(dir);
    }
    found
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        self.kill_kubelet();
        self.remove_pods();
        self.containerd.stop();
        self.containerd.kill_shims();
        self.kill_cgroup_processes();
        self.containerd.end_mount_namespace();
        self.unmount();
        self.remove_cgroups();
        self.remove_interfaces();
        self.remove_log_links();
        let mut live = LIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = self.dir.file_name().unwrap().to_string_lossy().into_owned();
        let containerd = self.containerd.dir.path().display().to_string();
        live.retain(|name| {
            *name != id && *name != containerd && *name != self.veth && *name != self.bridge
        });
        drop(live);
        let left: Vec<String> = leftovers()
            .into_iter()
            .filter(|thing| thing.contains(&id) || thing.contains(&containerd))
            .collect();
        if !left.is_empty() {
            eprintln!(
                "node {} left these behind; the next node will refuse to start:\n{}",
                self.name,
                left.join("\n")
            );
        }
    }
}
