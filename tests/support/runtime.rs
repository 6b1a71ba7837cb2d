//! Real containerd and a real OCI registry for tests, each in its own temp directory on its own
//! socket or port, killed and waited for on drop. Images are built with umoci and pushed with
//! skopeo; nothing is downloaded.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fails with the package to install when a tool is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed; these tests need it: apt-get install {package} \
         (bash scripts/test.sh installs everything the tests need)"
    );
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} not ready within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Where a node's containerd listens, in its mount namespace.
pub const NODE_SOCKET: &str = "/run/containerd/containerd.sock";

/// A containerd with its CRI plugin, all state under a temp directory.
pub struct Containerd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// The process holding the mount namespace a node's containerd runs in (see
    /// [`Containerd::start_for_node`]).
    namespace: Option<Child>,
}

impl Containerd {
    pub fn start() -> Self {
        Self::start_with_sandbox(None)
    }

    /// A containerd whose pod sandboxes run `sandbox_image` (see [`Registry::push_pause`]), so
    /// tests can create CRI containers without network access.
    pub fn start_with_sandbox(sandbox_image: Option<&str>) -> Self {
        Self::start_in(
            tempfile::Builder::new().prefix("ctd").tempdir().unwrap(),
            sandbox_image,
            None,
        )
    }

    /// The containerd of a real node, in `dir`: its pod sandboxes run `sandbox_image`, and
    /// pods get their network from the CNI configuration `conflist` with the machine's CNI
    /// plugins (`/usr/lib/cni`). It runs in a mount namespace of its own, which outlives its
    /// restarts (its kubelet joins it: [`Containerd::mount_namespace`]), with a `/run` of its
    /// own where it listens on `/run/containerd/containerd.sock`, as on a real node: a
    /// hostPath of `/run/containerd` (Coral's agent DaemonSet) reaches each node's own
    /// runtime, also after the runtime restarts and makes a new socket. From outside the
    /// namespace the socket is reached through the holder's root ([`Containerd::socket`]).
    /// What containerd and its containers mount goes with the namespace, when its last
    /// process ends.
    pub fn start_for_node(dir: tempfile::TempDir, sandbox_image: &str, conflist: &str) -> Self {
        Self::start_in(dir, Some(sandbox_image), Some(conflist))
    }

    fn start_in(
        dir: tempfile::TempDir,
        sandbox_image: Option<&str>,
        conflist: Option<&str>,
    ) -> Self {
        require("containerd", "containerd");
        let d = dir.path().display();
        // Sandboxes may not lower their OOM score below containerd's in this environment.
        let sandbox = sandbox_image.map_or(String::new(), |i| {
            format!("sandbox_image = {i:?}\n  restrict_oom_score_adj = true")
        });
        let address = if conflist.is_some() {
            NODE_SOCKET.to_string()
        } else {
            format!("{d}/containerd.sock")
        };
        // A node's pod network namespaces live under its state directory, not /run/netns.
        let netns = if conflist.is_some() {
            "\n  netns_mounts_under_state_dir = true"
        } else {
            ""
        };
        for sub in ["cni/bin", "cni/net.d", "certs.d", "opt"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        if let Some(conflist) = conflist {
            assert!(
                Path::new("/usr/lib/cni/bridge").is_file(),
                "the CNI plugins are not installed: apt-get install containernetworking-plugins \
                 (bash scripts/test.sh installs everything the tests need)"
            );
            for plugin in ["bridge", "host-local", "loopback", "portmap"] {
                std::os::unix::fs::symlink(
                    Path::new("/usr/lib/cni").join(plugin),
                    dir.path().join("cni/bin").join(plugin),
                )
                .unwrap();
            }
            std::fs::write(dir.path().join("cni/net.d/10-coral.conflist"), conflist).unwrap();
        }
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
[plugins."io.containerd.grpc.v1.cri"]
  stats_collect_period = 1
  {sandbox}{netns}
[grpc]
  address = "{address}"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "native"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/net.d"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{d}/certs.d"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
            ),
        )
        .unwrap();
        let namespace = conflist.is_some().then(|| {
            // The holder is named after containerd's directory, so that a leftover is found.
            let holder = Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--", "bash", "-c"])
                .arg(concat!(
                    "mount -t tmpfs -o mode=755 coral-node-run /run && mkdir /run/containerd ",
                    "&& exec -a \"mount namespace of $1\" sleep infinity"
                ))
                .arg("bash")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("unshare runs");
            // Made once the holder runs under its new name: before, the namespace may not
            // have its own /run yet, and a containerd started in it would listen on the
            // machine's.
            let cmdline = format!("/proc/{}/cmdline", holder.id());
            wait_until(
                "the node's mount namespace",
                Duration::from_secs(10),
                || std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"mount namespace of ")),
            );
            holder
        });
        let mut containerd = Self {
            child: None,
            dir,
            namespace,
        };
        containerd.resume();
        containerd
    }

    /// The CRI socket, as this process reaches it.
    pub fn socket(&self) -> PathBuf {
        match &self.namespace {
            Some(holder) => PathBuf::from(format!("/proc/{}/root{NODE_SOCKET}", holder.id())),
            None => self.dir.path().join("containerd.sock"),
        }
    }

    /// The mount namespace a node's containerd runs in (`/proc/PID/ns/mnt` of the process
    /// holding it), for its kubelet to join.
    pub fn mount_namespace(&self) -> Option<PathBuf> {
        self.namespace
            .as_ref()
            .map(|holder| PathBuf::from(format!("/proc/{}/ns/mnt", holder.id())))
    }

    /// `unix://…` address of the CRI socket.
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Stops containerd (its images stay on disk).
    pub fn stop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts containerd again on the same directory and socket.
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("containerd.log")).unwrap();
        let config = self.dir.path().join("config.toml");
        let mut command = match self.mount_namespace() {
            Some(namespace) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--mount={}", namespace.display()))
                    .arg("--");
                command.arg("containerd");
                command
            }
            None => Command::new("containerd"),
        };
        command.arg("--config").arg(&config);
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd starts");
        self.child = Some(child);
        let socket = self.socket();
        let log = self.dir.path().join("containerd.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("containerd successfully booted")
                && std::os::unix::net::UnixStream::connect(&socket).is_ok()
            {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let lines: Vec<&str> = text.lines().collect();
                panic!(
                    "containerd not ready within 20 s ({}), socket {}:\n{}",
                    exited.map_or("running".to_string(), |status| status.to_string()),
                    socket.display(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Containerd {
    /// Runs `coral prefetch` of the ImageSets `sets` (YAML) into this containerd, with `extra`
    /// flags: whether it succeeded, and what it printed.
    pub fn prefetch_sets(&self, sets: &str, extra: &[&str]) -> (bool, String) {
        let file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile_in(self.dir.path())
            .unwrap();
        std::fs::write(file.path(), sets).unwrap();
        let mut args = vec!["prefetch", "-f", file.path().to_str().unwrap()];
        let address = self.address();
        args.extend(["--cri-socket", &address]);
        args.extend(extra);
        coral(&args)
    }

    /// The same for one ImageSet of `images`.
    pub fn prefetch(&self, images: &[String], extra: &[&str]) -> (bool, String) {
        self.prefetch_sets(
            &format!(
                "apiVersion: coral.dev/v1alpha1\nkind: ImageSet\nmetadata: {{name: prefetch, namespace: default}}\nspec:\n  images: {images:?}\n"
            ),
            extra,
        )
    }
}

/// Runs the coral binary: whether it succeeded, and what it printed (stdout, then stderr).
pub fn coral(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_coral"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        self.kill_shims();
        self.end_mount_namespace();
    }
}

impl Containerd {
    /// Ends a node's mount namespace: what was mounted in it goes with its last process
    /// (call once containerd, its shims and the kubelet are gone).
    pub fn end_mount_namespace(&mut self) {
        stop(&mut self.namespace);
    }
}

impl Containerd {
    /// Kills the shims this containerd started (they outlive it by design) and the container
    /// processes under them, and waits until they are gone. Only processes whose command line
    /// names this containerd's directory, and their descendants, are touched.
    pub fn kill_shims(&self) {
        let dir = self.dir.path().display().to_string();
        let processes: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                let ppid: u32 = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                Some((
                    pid,
                    ppid,
                    String::from_utf8_lossy(&cmdline).replace('\0', " "),
                ))
            })
            .collect();
        // A node's shims run in its mount namespace (their command line names the socket
        // there, not the directory); the others name the directory.
        let namespace = self.namespace.as_ref().map(|holder| holder.id());
        let mount_ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let node_ns = namespace.and_then(mount_ns);
        let mut ours: Vec<u32> = processes
            .iter()
            .filter(|(pid, _, cmdline)| {
                cmdline.contains("containerd-shim")
                    && match &node_ns {
                        Some(ns) => Some(*pid) != namespace && mount_ns(*pid).as_ref() == Some(ns),
                        None => cmdline.contains(&dir),
                    }
            })
            .map(|(pid, _, _)| *pid)
            .collect();
        let mut i = 0;
        while i < ours.len() {
            let parent = ours[i];
            ours.extend(
                processes
                    .iter()
                    .filter(|(_, ppid, _)| *ppid == parent)
                    .map(|(pid, _, _)| *pid),
            );
            i += 1;
        }
        for pid in &ours {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ours.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
        }) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A static program (built with Go once per test process) that waits for SIGTERM or SIGINT.
pub fn pause_program() -> &'static [u8] {
    static PROGRAM: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PROGRAM.get_or_init(|| {
        require("go", "golang");
        let work = tempfile::tempdir().unwrap();
        std::fs::write(
            work.path().join("main.go"),
            "package main\n\nimport (\n\t\"os\"\n\t\"os/signal\"\n\t\"syscall\"\n)\n\nfunc main() {\n\tc := make(chan os.Signal, 1)\n\tsignal.Notify(c, syscall.SIGTERM, syscall.SIGINT)\n\t<-c\n}\n",
        )
        .unwrap();
        std::fs::write(work.path().join("go.mod"), "module pause\n\ngo 1.22\n").unwrap();
        let status = Command::new("go")
            .args(["build", "-ldflags=-s -w", "-o", "pause", "."])
            .env("CGO_ENABLED", "0")
            .current_dir(work.path())
            .status()
            .expect("go runs");
        assert!(status.success(), "go build of the pause program failed");
        std::fs::read(work.path().join("pause")).unwrap()
    })
}

/// A `docker-registry` on a free port of 127.0.0.1, optionally with htpasswd auth.
pub struct Registry {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    pub fn start(credentials: Option<(&str, &str)>) -> Self {
        Self::start_with(credentials, None)
    }

    /// A registry serving HTTPS with this certificate and key (PEM files), without auth.
    pub fn start_tls(certificate: &Path, key: &Path) -> Self {
        Self::start_with(None, Some((certificate, key)))
    }

    fn start_with(credentials: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> Self {
        require("docker-registry", "docker-registry");
        let dir = tempfile::Builder::new().prefix("reg").tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((certificate, key)) = tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                certificate.display(),
                key.display()
            ));
        }
        if let Some((user, password)) = credentials {
            require("htpasswd", "apache2-utils");
            let output = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .unwrap();
            assert!(output.status.success(), "htpasswd failed");
            std::fs::write(dir.path().join("htpasswd"), output.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: coral-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut registry = Self {
            child: None,
            dir,
            port,
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        registry.resume();
        registry
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        stop(&mut self.child);
    }

    /// The registry's own blob garbage collection, run while it is stopped (as the managed
    /// registry's init container runs it before the registry serves), with the configuration
    /// `config` where `/var/lib/registry` stands for this registry's storage: what it printed.
    pub fn garbage_collect(&mut self, config: &str) -> String {
        self.stop();
        let file = self.dir.path().join("gc.yml");
        let data = self.dir.path().join("data");
        std::fs::write(
            &file,
            config.replace("/var/lib/registry", &data.display().to_string()),
        )
        .unwrap();
        let output = Command::new("docker-registry")
            .arg("garbage-collect")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "garbage-collect failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.resume();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry starts");
        self.child = Some(child);
        let address = self.host();
        wait_until("registry", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&address).is_ok()
        });
    }

    /// Builds a tiny image holding `content` and pushes it as `NAME:TAG`; returns the
    /// reference.
    pub fn push(&self, name: &str, tag: &str, content: &str) -> String {
        self.push_bytes(name, tag, content.as_bytes())
    }

    /// [`Registry::push`] with any bytes as the file's content.
    pub fn push_bytes(&self, name: &str, tag: &str, content: &[u8]) -> String {
        self.push_files(name, tag, &[("data/content", content, 0o644)], None)
    }

    /// Pushes a pause image: a static program (built with Go) that waits for a signal, its
    /// entrypoint. A sandbox image for [`Containerd::start_with_sandbox`].
    pub fn push_pause(&self, name: &str, tag: &str) -> String {
        self.push_files(
            name,
            tag,
            &[("pause", pause_program(), 0o755)],
            Some("/pause"),
        )
    }

    /// An image that runs as a container: the pause program as its entrypoint, and a file
    /// holding `content` (so that each such image has its own digest).
    pub fn push_runnable(&self, name: &str, tag: &str, content: &str) -> String {
        self.push_files(
            name,
            tag,
            &[
                ("pause", pause_program(), 0o755),
                ("data/content", content.as_bytes(), 0o644),
            ],
            Some("/pause"),
        )
    }

    /// Pushes a base image for `binary` made from what the machine has: the shared libraries
    /// `ldd` names for it, `/etc/passwd` and `/etc/group` with `nonroot` (65532) as distroless
    /// has it, and `/tmp`. What a Dockerfile's `BASE_IMAGE` is given where no base can be
    /// pulled.
    pub fn push_base(&self, name: &str, tag: &str, binary: &Path) -> String {
        let ldd = Command::new("ldd").arg(binary).output().expect("ldd runs");
        assert!(ldd.status.success(), "ldd {}", binary.display());
        let libraries: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
            .lines()
            .filter_map(|line| {
                let path = match line.split_once("=>") {
                    Some((_, resolved)) => resolved.split_whitespace().next()?,
                    None => line.split_whitespace().next()?,
                };
                path.starts_with('/').then(|| path.to_string())
            })
            .collect();
        let contents: Vec<Vec<u8>> = libraries
            .iter()
            .map(|path| std::fs::read(path).unwrap())
            .collect();
        let passwd = b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
        let group = b"root:x:0:\nnonroot:x:65532:\n";
        let mut files: Vec<(&str, &[u8], u32)> = vec![
            ("etc/passwd", passwd, 0o644),
            ("etc/group", group, 0o644),
            ("tmp/", b"", 0o1777),
            ("home/nonroot/", b"", 0o755),
        ];
        for (path, content) in libraries.iter().zip(&contents) {
            files.push((path.trim_start_matches('/'), content, 0o755));
        }
        self.push_files(name, tag, &files, None)
    }

    /// Pushes an image of `files` (path in the root filesystem, content, mode; a path ending
    /// in `/` is a directory), with an optional entrypoint; returns its reference.
    pub fn push_files(
        &self,
        name: &str,
        tag: &str,
        files: &[(&str, &[u8], u32)],
        entrypoint: Option<&str>,
    ) -> String {
        require("umoci", "umoci");
        require("skopeo", "skopeo");
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("oci");
        let image = format!("{}:{tag}", layout.display());
        run(
            "umoci",
            &["init", "--layout", &layout.display().to_string()],
            None,
        );
        run("umoci", &["new", "--image", &image], None);
        let bundle = work.path().join("bundle");
        run(
            "umoci",
            &[
                "unpack",
                "--rootless",
                "--image",
                &image,
                &bundle.display().to_string(),
            ],
            None,
        );
        for (path, content, mode) in files {
            use std::os::unix::fs::PermissionsExt;
            if let Some(dir) = path.strip_suffix('/') {
                // A directory of its own (with its mode: /tmp's 1777, say).
                let dir = bundle.join("rootfs").join(dir);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(*mode)).unwrap();
                continue;
            }
            let file = bundle.join("rootfs").join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, content).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        run(
            "umoci",
            &["repack", "--image", &image, &bundle.display().to_string()],
            None,
        );
        if let Some(entrypoint) = entrypoint {
            run(
                "umoci",
                &[
                    "config",
                    "--image",
                    &image,
                    &format!("--config.entrypoint={entrypoint}"),
                ],
                None,
            );
        }
        let reference = format!("{}/{name}:{tag}", self.host());
        let mut args = vec![
            "copy".to_string(),
            "--quiet".to_string(),
            "--dest-tls-verify=false".to_string(),
        ];
        if let Some((user, password)) = &self.credentials {
            args.push(format!("--dest-creds={user}:{password}"));
        }
        args.push(format!("oci:{image}"));
        args.push(format!("docker://{reference}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("skopeo", &args, Some(work.path()));
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Registry {
    /// Pushes an image already in the registry under another name; returns the reference.
    pub fn copy(&self, from: &str, name: &str, tag: &str) -> String {
        let reference = format!("{}/{name}:{tag}", self.host());
        let mut args = vec![
            "copy".to_string(),
            "--quiet".to_string(),
            "--src-tls-verify=false".to_string(),
            "--dest-tls-verify=false".to_string(),
        ];
        if let Some((user, password)) = &self.credentials {
            args.push(format!("--src-creds={user}:{password}"));
            args.push(format!("--dest-creds={user}:{password}"));
        }
        args.push(format!("docker://{from}"));
        args.push(format!("docker://{reference}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("skopeo", &args, None);
        reference
    }
}

fn run(program: &str, args: &[&str], dir: Option<&Path>) {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Docker `config.json` with one credential.
pub fn docker_config(host: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({"auths": {host: {"auth": auth}}}).to_string()
}

impl Registry {
    /// Builds one tiny image per `(os, architecture, content)` in one OCI layout, an image
    /// index over them, and pushes the whole index as `NAME:TAG` (`skopeo copy --all`);
    /// returns the reference.
    pub fn push_index(&self, name: &str, tag: &str, platforms: &[(&str, &str, &str)]) -> String {
        require("umoci", "umoci");
        require("skopeo", "skopeo");
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("oci");
        let layout_text = layout.display().to_string();
        run("umoci", &["init", "--layout", &layout_text], None);
        for (i, (_, _, content)) in platforms.iter().enumerate() {
            let image = format!("{layout_text}:p{i}");
            run("umoci", &["new", "--image", &image], None);
            let bundle = work.path().join(format!("bundle{i}"));
            let bundle_text = bundle.display().to_string();
            run(
                "umoci",
                &["unpack", "--rootless", "--image", &image, &bundle_text],
                None,
            );
            std::fs::create_dir_all(bundle.join("rootfs/data")).unwrap();
            std::fs::write(bundle.join("rootfs/data/content"), content).unwrap();
            run("umoci", &["repack", "--image", &image, &bundle_text], None);
        }
        let index_path = layout.join("index.json");
        let mut layout_index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
        let entries = layout_index["manifests"].as_array().unwrap().clone();
        let manifests: Vec<serde_json::Value> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, architecture, _))| {
                let entry = entries
                    .iter()
                    .find(|e| {
                        e["annotations"]["org.opencontainers.image.ref.name"] == format!("p{i}")
                    })
                    .unwrap();
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": entry["digest"],
                    "size": entry["size"],
                    "platform": {"os": os, "architecture": architecture},
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap();
        let digest = coral::mirror::plan::sha256_digest(&index);
        let hex = digest.strip_prefix("sha256:").unwrap();
        std::fs::write(layout.join("blobs/sha256").join(hex), &index).unwrap();
        layout_index["manifests"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest,
                "size": index.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }));
        std::fs::write(&index_path, serde_json::to_vec(&layout_index).unwrap()).unwrap();
        let reference = format!("{}/{name}:{tag}", self.host());
        let mut args = vec![
            "copy".to_string(),
            "--quiet".to_string(),
            "--all".to_string(),
            "--dest-tls-verify=false".to_string(),
        ];
        if let Some((user, password)) = &self.credentials {
            args.push(format!("--dest-creds={user}:{password}"));
        }
        args.push(format!("oci:{layout_text}:{tag}"));
        args.push(format!("docker://{reference}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("skopeo", &args, Some(work.path()));
        reference
    }

    /// The manifest `reference` names here, as the registry serves it.
    pub fn manifest(&self, reference: &str) -> Vec<u8> {
        let mut args = vec![
            "inspect".to_string(),
            "--raw".to_string(),
            "--tls-verify=false".to_string(),
        ];
        if let Some((user, password)) = &self.credentials {
            args.push(format!("--creds={user}:{password}"));
        }
        args.push(format!("docker://{reference}"));
        let output = Command::new("skopeo").args(&args).output().unwrap();
        assert!(
            output.status.success(),
            "skopeo inspect {reference}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// Whether the registry serves a manifest under `reference`.
    pub fn manifest_exists(&self, reference: &str) -> bool {
        let mut command = Command::new("skopeo");
        command.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some((user, password)) = &self.credentials {
            command.arg(format!("--creds={user}:{password}"));
        }
        command
            .arg(format!("docker://{reference}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// The digest of the manifest `reference` names here.
    pub fn manifest_digest(&self, reference: &str) -> String {
        coral::mirror::plan::sha256_digest(&self.manifest(reference))
    }
}

impl Registry {
    /// Where this registry stores the blob `digest` (`sha256:…`) on disk.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}
