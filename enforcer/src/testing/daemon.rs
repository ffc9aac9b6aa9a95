//! Daemon nodes for tests and the demo: one network namespace (joined to the others by veth),
//! a scope cgroup, and a real `enforcer run` process inside the namespace with its own state
//! directory, configuration, policy file, pin directory and control socket. Everything is
//! driven the way an operator drives it: through the CLI.
//!
//! Dropping a node kills its daemon (by pid), uninstalls its datapath (unpinning every link,
//! which detaches the programs) and removes its scope cgroup and files.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process};
use tempfile::TempDir;

use super::{Node, ScratchCgroup, Spawn, Spawned, datapath::BPFFS, report, unique_name};
use crate::{
    audit::AuditRecord,
    identity::{CertificateAuthority, JWT_KEY_FILE, ROOT_FILE_STEM, write_private},
    kernel::Datapath,
};

/// How long a daemon gets to answer on its control socket after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`DaemonNode::wait_until`] waits.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What a node is given besides its policy.
#[derive(Clone, Debug, Default)]
pub struct NodeSetup {
    /// TOML appended to the node's configuration (whole tables: it follows `[kernel]`).
    pub config: String,
    /// The trust domain's JWT signing key (PKCS#8 PEM), put in the node's CA directory as
    /// `jwt.key`, so that nodes given the same key validate each other's JWT-SVIDs.
    pub jwt_key: Option<String>,
}

/// One node running the real daemon.
pub struct DaemonNode {
    name: String,
    binary: PathBuf,
    // Declared before the scope: the daemon goes before its cgroup and files.
    daemon: Option<Spawned>,
    /// The cgroup the daemon runs in; `None`: the caller's.
    home: Option<ScratchCgroup>,
    dir: TempDir,
    pin_dir: PathBuf,
    scope: ScratchCgroup,
    scope_path: String,
    link: Node,
    setup: NodeSetup,
}

impl DaemonNode {
    /// Start node `name` on the veth end `link`: a scope cgroup, a state directory holding the
    /// trust domain's `root` CA (so every node issues its own intermediate below the same
    /// root), the policy `policy(scope)` returns for the scope's cgroup path, and
    /// `binary run --config ...` inside the namespace. Returns once the daemon answers.
    pub fn start(
        binary: &Path,
        link: &Node,
        name: &str,
        root: &CertificateAuthority,
        policy: impl FnOnce(&str) -> String,
    ) -> Self {
        Self::start_with(binary, link, name, root, None, NodeSetup::default(), policy)
    }

    /// [`start`](Self::start), with `setup` added to the node's configuration and CA files.
    pub fn start_set_up(
        binary: &Path,
        link: &Node,
        name: &str,
        root: &CertificateAuthority,
        setup: NodeSetup,
        policy: impl FnOnce(&str) -> String,
    ) -> Self {
        Self::start_with(binary, link, name, root, None, setup, policy)
    }

    /// [`start`](Self::start), with the daemon in the cgroup `home` instead of the caller's.
    pub fn start_in(
        binary: &Path,
        link: &Node,
        name: &str,
        root: &CertificateAuthority,
        home: &ScratchCgroup,
        policy: impl FnOnce(&str) -> String,
    ) -> Self {
        Self::start_with(
            binary,
            link,
            name,
            root,
            Some(home.clone()),
            NodeSetup::default(),
            policy,
        )
    }

    fn start_with(
        binary: &Path,
        link: &Node,
        name: &str,
        root: &CertificateAuthority,
        home: Option<ScratchCgroup>,
        setup: NodeSetup,
        policy: impl FnOnce(&str) -> String,
    ) -> Self {
        let scope = ScratchCgroup::new(name);
        let scope_path = scope.policy_path();
        let dir = TempDir::new().expect("state directory");
        let ca_dir = dir.path().join("state").join("ca");
        fs::create_dir_all(&ca_dir).expect("CA directory");
        root.write(&ca_dir, ROOT_FILE_STEM)
            .unwrap_or_else(|error| panic!("failed to write the root CA: {}", report(&error)));
        if let Some(key) = &setup.jwt_key {
            write_private(&ca_dir.join(JWT_KEY_FILE), key)
                .unwrap_or_else(|error| panic!("failed to write the JWT key: {}", report(&error)));
        }
        let mut node = Self {
            name: name.to_owned(),
            binary: binary.to_owned(),
            daemon: None,
            home,
            pin_dir: Path::new(BPFFS).join(unique_name(&format!("daemon-{name}"))),
            dir,
            scope,
            scope_path,
            link: link.clone(),
            setup,
        };
        node.write_policy(&policy(&node.scope_path));
        node.write_config();
        node.launch();
        node
    }

    /// The node's configuration; its Workload API socket is in the node's directory unless
    /// the setup names one (every node would otherwise claim the default path).
    fn write_config(&self) {
        let extra = if self.setup.config.contains("[workload_api]") {
            self.setup.config.clone()
        } else {
            format!(
                "{}\n[workload_api]\nsocket = \"{}\"\n",
                self.setup.config,
                self.dir.path().join("api.sock").display()
            )
        };
        let config = format!(
            "node_name = \"{name}\"\nstate_dir = \"{state}\"\npolicy = \"{policy}\"\n\
             control_socket = \"{socket}\"\ndrain_timeout = \"20s\"\nrescan_interval = \"500ms\"\n\
             [kernel]\npin_dir = \"{pins}\"\nscope_cgroup = \"{scope}\"\n{extra}",
            name = self.name,
            state = self.dir.path().join("state").display(),
            policy = self.policy_path().display(),
            socket = self.socket().display(),
            pins = self.pin_dir.display(),
            scope = self.scope_path,
        );
        fs::write(self.config_path(), config).expect("write the configuration");
    }

    /// Write the node's policy file (what SIGHUP reloads).
    fn write_policy(&self, text: &str) {
        fs::write(self.policy_path(), text).expect("write the policy");
    }

    /// Start the daemon process (in its home cgroup, if it has one).
    fn spawn_daemon(&mut self) {
        // `nsenter` joins only the network namespace: `ip netns exec` would also remount /sys,
        // hiding the cgroup2 and bpffs mounts the daemon works with.
        let mut spawn = Spawn::new("nsenter");
        if let Some(home) = &self.home {
            spawn = spawn.cgroup(home);
        }
        let daemon = spawn
            .arg(format!("--net=/run/netns/{}", self.link.netns().name()))
            .arg(&self.binary)
            .args(["--log", "info,enforcer=debug", "run", "--config"])
            .arg(self.config_path())
            .spawn();
        self.daemon = Some(daemon);
    }

    /// Start the daemon process and wait until its control socket answers.
    fn launch(&mut self) {
        self.spawn_daemon();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.cli(&["status", "--json"]).status.success() {
                return;
            }
            let exited = self
                .daemon
                .as_mut()
                .and_then(|d| d.wait_timeout(Duration::ZERO));
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "node {}: the daemon did not come up ({exited:?}); its log:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Start the daemon again after it stopped or was killed.
    pub fn restart(&mut self) {
        assert!(
            self.daemon
                .as_mut()
                .is_none_or(|d| d.wait_timeout(Duration::ZERO).is_some()),
            "node {}: the daemon is still running",
            self.name
        );
        self.launch();
    }

    /// Make `policy` the node's policy file and start the daemon again after it stopped,
    /// expecting it to refuse to start: panics if it is still running after the start timeout
    /// or exits successfully. Returns what it logged.
    pub fn restart_refused(&mut self, policy: &str) -> String {
        assert!(
            self.daemon
                .as_mut()
                .is_none_or(|d| d.wait_timeout(Duration::ZERO).is_some()),
            "node {}: the daemon is still running",
            self.name
        );
        self.write_policy(policy);
        self.spawn_daemon();
        let exited = self.wait(START_TIMEOUT);
        let log = self.log();
        match exited {
            None => panic!(
                "node {}: the daemon started although it should have refused; its log:\n{log}",
                self.name
            ),
            Some(status) => assert!(
                !status.success(),
                "node {}: the daemon exited successfully instead of refusing to start; its log:\n{log}",
                self.name
            ),
        }
        log
    }

    /// Send `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        let pid = self.pid();
        let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits")).expect("pid is not 0");
        kill_process(pid, signal)
            .unwrap_or_else(|error| panic!("failed to signal the daemon: {error}"));
    }

    /// Wait up to `timeout` for the daemon to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.daemon.as_mut().and_then(|d| d.wait_timeout(timeout))
    }

    /// The daemon's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("a daemon was started").pid()
    }

    /// What the daemon logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Spawned::stderr)
            .unwrap_or_default()
    }

    /// Run `enforcer --socket <this node's socket> args...` (from the host: the control socket
    /// is a file, not bound to the namespace).
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("failed to run {}: {error}", self.binary.display()))
    }

    /// [`cli`](Self::cli), panicking with both streams unless it succeeds; returns stdout.
    #[must_use]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "node {}: `enforcer {}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
            self.name,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Every audit record `enforcer flows --json` prints, narrowed by `filters` (more `flows`
    /// arguments, e.g. `--verdict deny`); panics on a line that is not a record.
    #[must_use]
    pub fn flows(&self, filters: &[&str]) -> Vec<AuditRecord> {
        let mut args = vec!["flows", "--json", "--limit", "10000"];
        args.extend_from_slice(filters);
        self.cli_ok(&args)
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|error| {
                    panic!("`enforcer flows --json` printed {line:?}: {error}")
                })
            })
            .collect()
    }

    /// A builder that places `program` in `cgroup` (a child of [`scope`](Self::scope)) inside
    /// this node's namespace.
    pub fn spawn(&self, cgroup: &ScratchCgroup, program: impl AsRef<OsStr>) -> Spawn {
        Spawn::new(program).cgroup(cgroup).netns(self.link.netns())
    }

    /// The scope cgroup the datapath is attached to; workload cgroups are its children.
    pub fn scope(&self) -> &ScratchCgroup {
        &self.scope
    }

    /// The scope's path as policies write it.
    #[must_use]
    pub fn scope_path(&self) -> &str {
        &self.scope_path
    }

    /// The node's namespace and veth end.
    #[must_use]
    pub fn link(&self) -> &Node {
        &self.link
    }

    /// Wait up to 15 s until `ready(self)` holds, panicking with the daemon's log if it never
    /// does.
    pub fn wait_until(&self, what: &str, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "node {}: timed out waiting for {what}; daemon log:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Wait until the audit trail holds a record that `matches`, and return the newest such
    /// (`flows` also reads back earlier runs' records from the audit files).
    pub fn wait_for_record(
        &self,
        what: &str,
        matches: impl Fn(&AuditRecord) -> bool,
    ) -> AuditRecord {
        let mut found = None;
        self.wait_until(what, |node| {
            found = node.flows(&[]).into_iter().rev().find(&matches);
            found.is_some()
        });
        found.expect("wait_until returned, so a record matched")
    }

    /// The daemon's bpffs directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The control socket.
    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// The policy file.
    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// The configuration file.
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("enforcer.toml")
    }

    /// The current audit log file.
    #[must_use]
    pub fn audit_path(&self) -> PathBuf {
        self.dir
            .path()
            .join("state")
            .join("audit")
            .join("audit.jsonl")
    }

    /// A scratch directory of this node (for policy files to reload).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for DaemonNode {
    fn drop(&mut self) {
        // Spawned's drop kills the daemon by pid and reaps it.
        self.daemon = None;
        if let Err(error) = Datapath::uninstall(&self.pin_dir) {
            eprintln!(
                "node {}: failed to uninstall {}: {}",
                self.name,
                self.pin_dir.display(),
                report(&error)
            );
        }
    }
}
