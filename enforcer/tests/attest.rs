//! Attestation of real processes: facts, the running binary's hash across replacement and
//! exec, cgroup and namespace facts.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{fs, path::Path, process::Command, time::Duration};

use enforcer::{
    attest::{AttestError, AttestOptions, Attestor, HashError, Identification, Registry},
    testing::{Netns, ScratchCgroup, Spawn, require_root, serial, unique_name},
};

/// `sha256sum FILE`, computed by a program that is not ours.
fn sha256sum(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8(output.stdout).unwrap()[..64].to_owned()
}

fn attestor() -> Attestor {
    Attestor::new(AttestOptions::default())
}

/// A private copy of a system binary in a scratch directory, removed on drop.
struct BinaryCopy {
    dir: std::path::PathBuf,
}

impl BinaryCopy {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("bin"));
        fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    fn install(&self, name: &str, from: &str) -> std::path::PathBuf {
        let staged = self.dir.join(format!(".{name}.new"));
        fs::copy(from, &staged).unwrap();
        let path = self.dir.join(name);
        fs::rename(&staged, &path).unwrap();
        path
    }
}

impl Drop for BinaryCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The program's file, found on `PATH` (not a shell builtin).
fn which(program: &str) -> String {
    std::env::var("PATH")
        .unwrap()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{program} not found on PATH"))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn facts_of_a_process_in_a_cgroup_and_namespace() {
    let _serial = serial();
    require_root();
    let cgroup = ScratchCgroup::new("attest");
    let netns = Netns::new("attest");
    let process = Spawn::new("sleep")
        .arg("30")
        .cgroup(&cgroup)
        .netns(&netns)
        .spawn();

    let facts = attestor().attest(process.pid()).unwrap();
    assert_eq!(facts.pid, process.pid());
    assert_eq!((facts.uid, facts.gid), (0, 0));
    assert_eq!(facts.user.as_deref(), Some("root"));
    let sleep = fs::canonicalize(which("sleep")).unwrap();
    assert_eq!(facts.exe, sleep);
    assert_eq!(facts.sha256.to_string(), sha256sum(&sleep));
    let mount = enforcer::kernel::cgroup::cgroup2_mount().unwrap();
    assert_eq!(
        Some(facts.cgroup.clone()),
        enforcer::attest::cgroup_relative_path(&mount, cgroup.path())
    );
    assert_eq!(facts.cgroup_id, Some(cgroup.id()));
    let ours = fs::metadata("/proc/self/ns/net").unwrap();
    assert_ne!(facts.netns, std::os::unix::fs::MetadataExt::ino(&ours));
    assert_eq!(facts.container.container_id, None);
}

#[test]
fn a_binary_replaced_on_disk_keeps_its_running_hash_and_exec_changes_it() {
    let _serial = serial();
    let copies = BinaryCopy::new();
    let worker = copies.install("worker", &which("sleep"));
    let original = sha256sum(&worker);
    let process = Spawn::new(&worker).arg("30").spawn();
    let attestor = attestor();
    assert_eq!(
        attestor.attest(process.pid()).unwrap().sha256.to_string(),
        original
    );

    // Replace the file at the same path (the way package managers do: write, then rename).
    let replaced = copies.install("worker", &which("true"));
    assert_ne!(sha256sum(&replaced), original);
    let cached = attestor.attest(process.pid()).unwrap();
    assert_eq!(cached.sha256.to_string(), original);
    let facts = attestor.attest_fresh(process.pid()).unwrap();
    assert_eq!(
        facts.sha256.to_string(),
        original,
        "the running inode is hashed"
    );
    assert!(
        facts.exe.to_string_lossy().ends_with(" (deleted)"),
        "{:?}",
        facts.exe
    );

    // A shell that execs another binary gets the new binary's hash.
    let mut shell = Spawn::new("sh")
        .args(["-c", "read line; exec sleep 30"])
        .stdin_piped()
        .spawn();
    let before = attestor.attest(shell.pid()).unwrap();
    assert_eq!(
        before.sha256.to_string(),
        sha256sum(&fs::canonicalize(which("sh")).unwrap())
    );
    shell.write_line("go");
    let sleep_hash = sha256sum(&fs::canonicalize(which("sleep")).unwrap());
    let changed = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        attestor
            .attest(shell.pid())
            .is_ok_and(|facts| facts.sha256.to_string() == sleep_hash)
    });
    assert!(changed, "exec did not change the hash");
}

#[test]
fn binaries_above_the_cap_are_refused_with_a_reason() {
    let _serial = serial();
    let process = Spawn::new("sleep").arg("30").spawn();
    let attestor = Attestor::new(AttestOptions {
        max_binary_bytes: 1024,
        ..AttestOptions::default()
    });
    match attestor.attest(process.pid()) {
        Err(AttestError::Hash {
            pid,
            source: HashError::TooLarge { max: 1024, .. },
        }) => assert_eq!(pid, process.pid()),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn user_names_come_from_the_account_database() {
    let _serial = serial();
    require_root();
    let process = Spawn::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "30",
        ])
        .spawn();
    // setpriv execs sleep; wait until the process is the sleeping one.
    let attestor = attestor();
    let facts = (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            attestor
                .attest(process.pid())
                .ok()
                .filter(|facts| facts.uid == 65534)
        })
        .expect("attest the unprivileged process");
    assert_eq!(facts.user.as_deref(), Some("nobody"));
    assert_eq!(facts.gid, 65534);
}

#[test]
fn a_sha256_entry_follows_the_running_binary_not_the_file_on_disk() {
    let _serial = serial();
    let copies = BinaryCopy::new();
    let worker = copies.install("worker", &which("sleep"));
    let text = format!(
        "trust_domain = \"example.org\"\n[[workload]]\nid = \"spiffe://example.org/worker\"\n\
         selectors = [\"unix:sha256:{}\", \"unix:uid:{}\"]\n",
        sha256sum(&worker),
        effective_uid()
    );
    let (policy, _) = enforcer::policy::parse("p.toml", text.as_bytes()).unwrap();
    let registry = Registry::new(policy.workloads);
    let attestor = attestor();
    let expected = Identification::Matched {
        id: "spiffe://example.org/worker".parse().unwrap(),
        entry: 0,
    };

    let original = Spawn::new(&worker).arg("30").spawn();
    assert_eq!(
        registry.identify(&attestor.attest(original.pid()).unwrap()),
        expected
    );

    // An impostor binary installed at the same path does not inherit the identity ...
    copies.install("worker", &which("sh"));
    let impostor = Spawn::new(&worker)
        .args(["-c", "read line"])
        .stdin_piped()
        .spawn();
    assert_eq!(
        registry.identify(&attestor.attest(impostor.pid()).unwrap()),
        Identification::Unmatched
    );
    // ... while the process started from the original keeps it.
    assert_eq!(
        registry.identify(&attestor.attest(original.pid()).unwrap()),
        expected
    );
}

/// This test process's effective uid (the spawned workers inherit it).
fn effective_uid() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}
