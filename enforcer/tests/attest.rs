//! Attestation of real processes: facts, the running binary's hash across replacement and
//! exec, cgroup and namespace facts, and what a `unix:sha256` pin says about loaded code.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use enforcer::{
    attest::{AttestError, AttestOptions, Attestor, HashError, LoadedCodeIssue, MappingProblem},
    policy::{Identification, Registry},
    testing::{Netns, ScratchCgroup, Spawn, Spawned, require_root, serial, unique_name},
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
    let mount = enforcer::kernel::cgroup2_mount().unwrap();
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

/// The loader variables among `issues`.
fn loader_variables(issues: &[LoadedCodeIssue]) -> Vec<&LoadedCodeIssue> {
    issues
        .iter()
        .filter(|issue| matches!(issue, LoadedCodeIssue::LoaderVariable { .. }))
        .collect()
}

#[test]
fn an_exec_of_the_same_binary_is_never_served_the_old_images_cached_facts() {
    let _serial = serial();
    let sh = fs::canonicalize(which("sh")).unwrap();
    let libc = own_library("libc");
    // A shell with a clean environment that, told to, execs itself (the same inode) with
    // LD_PRELOAD set.
    let script = format!(
        "read line; export LD_PRELOAD={}; exec {} -c 'read line'",
        libc.display(),
        sh.display()
    );
    let mut shell = Spawn::new(&sh)
        .args(["-c", &script])
        .env_clear()
        .stdin_piped()
        .spawn();
    let pid = shell.pid();
    // A cache that would serve an entry for the whole test, whatever the machine's speed.
    let attestor = Attestor::new(AttestOptions {
        cache_ttl: Duration::from_mins(10),
        ..AttestOptions::default()
    });
    // The kernel's image generations of the two images (any two distinct numbers).
    let (first, second) = (1_000, 2_000);
    let before = attestor.attest_for(pid, first).unwrap();
    assert!(
        loader_variables(&before.loaded_code).is_empty(),
        "{before:?}"
    );

    shell.write_line("exec");
    let environ = format!("/proc/{pid}/environ");
    let execed = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        fs::read(&environ).is_ok_and(|env| env.windows(10).any(|w| w == b"LD_PRELOAD"))
    });
    assert!(execed, "the shell did not exec itself with LD_PRELOAD");

    let after = attestor.attest_for(pid, second).unwrap();
    assert_eq!(after.exe, before.exe, "the same binary");
    assert_eq!(after.start_time, before.start_time, "the same process");
    assert_eq!(
        loader_variables(&after.loaded_code),
        [&LoadedCodeIssue::LoaderVariable {
            name: "LD_PRELOAD",
            value: libc.display().to_string(),
        }],
        "the new image was served the old image's facts"
    );
    // The entry now belongs to the second image, and is served for it.
    let again = attestor.attest_for(pid, second).unwrap();
    assert_eq!(again, after);
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
    require_root();
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

    // Cleared environments: cargo's LD_LIBRARY_PATH would have the pinned entry refused.
    let original = Spawn::new(&worker).arg("30").env_clear().spawn();
    assert_eq!(
        registry.identify(&attestor.attest(original.pid()).unwrap()),
        expected
    );

    // An impostor binary installed at the same path does not inherit the identity ...
    copies.install("worker", &which("sh"));
    let impostor = Spawn::new(&worker)
        .args(["-c", "read line"])
        .env_clear()
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

/// A registry of `entries` (SPIFFE ID path, selectors) in trust domain `example.org`.
fn registry(entries: &[(&str, Vec<String>)]) -> Registry {
    let mut text = "trust_domain = \"example.org\"\n".to_owned();
    for (name, selectors) in entries {
        writeln!(
            text,
            "[[workload]]\nid = \"spiffe://example.org/{name}\"\nselectors = {selectors:?}"
        )
        .unwrap();
    }
    let (policy, _) = enforcer::policy::parse("p.toml", text.as_bytes()).unwrap();
    Registry::new(policy.workloads)
}

fn matched(name: &str, entry: usize) -> Identification {
    Identification::Matched {
        id: format!("spiffe://example.org/{name}").parse().unwrap(),
        entry,
    }
}

fn refused(name: &str, entry: usize, reasons: Vec<LoadedCodeIssue>) -> Identification {
    Identification::Refused {
        id: format!("spiffe://example.org/{name}").parse().unwrap(),
        entry,
        reasons,
    }
}

/// The path of an executable mapping of this test process whose file name starts with
/// `prefix`: a root-owned system library that exists on this machine.
fn own_library(prefix: &str) -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.contains('x'))
        })
        .filter_map(|line| line.split_whitespace().nth(5).map(PathBuf::from))
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("this test process maps no {prefix}* library:\n{maps}"))
}

#[test]
fn a_sha256_pin_is_refused_when_the_environment_asks_the_loader_for_more_code() {
    let _serial = serial();
    require_root();
    let copies = BinaryCopy::new();
    let worker = copies.install("worker", &which("sleep"));
    let uid = format!("unix:uid:{}", effective_uid());
    let pinned = registry(&[(
        "worker",
        vec![format!("unix:sha256:{}", sha256sum(&worker)), uid.clone()],
    )]);
    let by_path = registry(&[(
        "by-path",
        vec![format!("unix:path:{}", worker.display()), uid],
    )]);
    let attestor = attestor();
    let identify = |registry: &Registry, process: &Spawned| {
        registry.identify(&attestor.attest(process.pid()).unwrap())
    };
    let libc = own_library("libc");
    let libc = libc.to_str().unwrap();

    let clean = Spawn::new(&worker).arg("30").env_clear().spawn();
    assert!(
        attestor.attest(clean.pid()).unwrap().loaded_code.is_empty(),
        "a copy of sleep in a root-owned directory with an empty environment"
    );
    assert_eq!(identify(&pinned, &clean), matched("worker", 0));

    // Variables that change how the loader binds or reports, not what it maps, are allowed.
    let bind_now = Spawn::new(&worker)
        .arg("30")
        .env_clear()
        .env("LD_BIND_NOW", "1")
        .env("LD_PRELOAD", "")
        .spawn();
    assert_eq!(identify(&pinned, &bind_now), matched("worker", 0));

    // Preloading even a root-owned library (libc, mapped anyway) is code the pin did not see.
    let preloaded = Spawn::new(&worker)
        .arg("30")
        .env_clear()
        .env("LD_PRELOAD", libc)
        .spawn();
    let reasons = vec![LoadedCodeIssue::LoaderVariable {
        name: "LD_PRELOAD",
        value: libc.to_owned(),
    }];
    assert_eq!(
        identify(&pinned, &preloaded),
        refused("worker", 0, reasons.clone())
    );
    assert!(
        reasons[0].to_string().contains("LD_PRELOAD"),
        "{}",
        reasons[0]
    );

    let library_path = Spawn::new(&worker)
        .arg("30")
        .env_clear()
        .env("LD_LIBRARY_PATH", "/tmp/x")
        .spawn();
    assert_eq!(
        identify(&pinned, &library_path),
        refused(
            "worker",
            0,
            vec![LoadedCodeIssue::LoaderVariable {
                name: "LD_LIBRARY_PATH",
                value: "/tmp/x".to_owned(),
            }]
        )
    );

    // An entry that does not pin the hash never vouched for loaded code: documented boundary.
    assert_eq!(identify(&by_path, &preloaded), matched("by-path", 0));
}

/// The real python3 interpreter (not a shim script that execs it).
fn python() -> PathBuf {
    let output = Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3 is needed for this test");
    assert!(output.status.success(), "python3 failed: {output:?}");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// Loads each library with ctypes, says so, and sleeps.
const LOAD_LIBRARIES: &str = "import ctypes, sys, time\n\
    for path in sys.argv[1:]:\n    ctypes.CDLL(path)\n\
    print('loaded', flush=True)\ntime.sleep(600)\n";

/// `python` with an empty environment, once it has loaded `libraries`.
fn python_loading(python: &Path, libraries: &[&Path]) -> Spawned {
    let process = Spawn::new(python)
        .args(["-c", LOAD_LIBRARIES])
        .args(libraries)
        .env_clear()
        .spawn();
    assert_eq!(
        process.read_line(Duration::from_secs(10)).as_deref(),
        Some("loaded"),
        "python did not load {libraries:?}: {}",
        process.stderr()
    );
    process
}

#[test]
fn a_pinned_interpreter_that_maps_a_library_a_non_root_user_could_write_is_refused() {
    let _serial = serial();
    require_root();
    let python = python();
    let pinned = registry(&[(
        "python",
        vec![
            format!("unix:sha256:{}", sha256sum(&python)),
            format!("unix:uid:{}", effective_uid()),
        ],
    )]);
    let attestor = attestor();
    let identify = |process: &Spawned| pinned.identify(&attestor.attest(process.pid()).unwrap());
    let system = own_library("libgcc_s");

    // Only root-owned libraries, one of them loaded by hand: the pin holds.
    let clean = python_loading(&python, &[&system]);
    assert_eq!(identify(&clean), matched("python", 0));

    let scratch = BinaryCopy::new();
    let nobodys = scratch.dir.join("nobody");
    fs::create_dir(&nobodys).unwrap();
    std::os::unix::fs::chown(&nobodys, Some(65534), Some(65534)).unwrap();

    // A library nobody (uid 65534) put in their directory.
    let theirs = nobodys.join("libtheirs.so");
    fs::copy(&system, &theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let process = python_loading(&python, &[&theirs]);
    assert_eq!(
        identify(&process),
        refused(
            "python",
            0,
            vec![LoadedCodeIssue::Mapping {
                path: theirs.clone(),
                problem: MappingProblem::Owner(65534),
            }]
        )
    );

    // A root-owned library that the group may write.
    let group_writable = scratch.dir.join("libgroup.so");
    fs::copy(&system, &group_writable).unwrap();
    fs::set_permissions(&group_writable, fs::Permissions::from_mode(0o664)).unwrap();
    let process = python_loading(&python, &[&group_writable]);
    assert_eq!(
        identify(&process),
        refused(
            "python",
            0,
            vec![LoadedCodeIssue::Mapping {
                path: group_writable.clone(),
                problem: MappingProblem::Writable(0o664),
            }]
        )
    );

    // The mapped inode is what counts, not its directory: a root-owned, read-only library in
    // nobody's directory is root's code (nobody could only have replaced it before the load,
    // and then the mapped file would be theirs) ...
    let roots = nobodys.join("libroots.so");
    fs::copy(&system, &roots).unwrap();
    fs::set_permissions(&roots, fs::Permissions::from_mode(0o644)).unwrap();
    let process = python_loading(&python, &[&roots]);
    assert_eq!(identify(&process), matched("python", 0));
    // ... until it is deleted: a mapped file without a name is no longer known to be root's.
    fs::remove_file(&roots).unwrap();
    assert_eq!(
        pinned.identify(&attestor.attest_fresh(process.pid()).unwrap()),
        refused(
            "python",
            0,
            vec![LoadedCodeIssue::Mapping {
                path: roots,
                problem: MappingProblem::Deleted,
            }]
        )
    );
}
