//! `cargo xtask bench attest`: attestation and policy costs. Prints figures and ratios from
//! one run; asserts nothing.
//! 1. cached attestation of a running process, per call (target <= 10 us);
//! 2. fresh attestation (binary hash cached) of `sleep` and of `python3` with ctypes loaded,
//!    per call: what reading the maps and examining each mapped file costs;
//! 3. first attestation of a process whose binary is 50 MB (target <= 60 ms);
//! 4. authorization decisions per second with 10,000 rules vs 10 rules (target ratio >= 0.95);
//! 5. compile + diff of a 10,000-rule policy (target <= 100 ms).
#![expect(
    unused_crate_dependencies,
    reason = "a benchmark program uses the library, not every dependency"
)]

mod common;

use std::{
    fmt::Write as _,
    fs,
    hint::black_box,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use enforcer::{
    attest::{AttestOptions, Attestor},
    identity::SpiffeId,
    policy::{self, Authorizer, compile},
    testing::{Spawn, unique_name},
};

use common::median;

fn main() {
    println!("attest benchmark");
    cached_attestation();
    fresh_attestation();
    large_binary();
    authorization();
    compile_and_diff();
}

fn cached_attestation() {
    let process = Spawn::new("sleep").arg("60").spawn();
    let attestor = Attestor::new(AttestOptions::default());
    attestor.attest(process.pid()).expect("warm up");
    let calls = 20_000;
    let start = Instant::now();
    for _ in 0..calls {
        black_box(attestor.attest(process.pid()).expect("attest"));
    }
    let per_call = start.elapsed() / calls;
    println!("cached attestation: {per_call:?} per call (target <= 10us)");
}

/// Debian's python3, which `cargo xtask setup` installs.
const PYTHON: &str = "/usr/bin/python3";

fn fresh_attestation() {
    let sleep = Spawn::new("sleep").arg("60").spawn();
    let python = Spawn::new(PYTHON)
        .args([
            "-c",
            "import ctypes, time\nprint('ready', flush=True)\ntime.sleep(60)",
        ])
        .spawn();
    assert_eq!(
        python.read_line(Duration::from_secs(10)).as_deref(),
        Some("ready"),
        "{PYTHON} did not start: {}",
        python.stderr()
    );
    let attestor = Attestor::new(AttestOptions::default());
    let per_call = |pid: u32| {
        let files = executable_files(pid);
        attestor.attest_fresh(pid).expect("warm up the hash cache");
        let calls = 2_000;
        let start = Instant::now();
        for _ in 0..calls {
            black_box(attestor.attest_fresh(pid).expect("attest"));
        }
        (start.elapsed() / calls, files)
    };
    let (sleep_time, sleep_files) = per_call(sleep.pid());
    let (python_time, python_files) = per_call(python.pid());
    println!(
        "fresh attestation, binary hash cached: sleep ({sleep_files} executable files) \
         {sleep_time:?}, python3 with ctypes ({python_files}) {python_time:?} per call"
    );
}

/// How many distinct files `pid` maps executable.
fn executable_files(pid: u32) -> usize {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut files: Vec<&str> = maps
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.contains('x'))
        })
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|name| name.starts_with('/'))
        .collect();
    files.sort_unstable();
    files.dedup();
    files.len()
}

/// A 50 MB executable: a copy of `sleep` padded with 50 MB of trailing data (the loader does
/// not read it, the hasher must).
fn large_binary() {
    let dir = std::env::temp_dir().join(unique_name("bench-bin"));
    fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("big-sleep");
    let sleep = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| std::path::Path::new(d).join("sleep"))
        .find(|p| p.is_file())
        .expect("sleep on PATH");
    let mut bytes = fs::read(sleep).expect("read sleep");
    bytes.resize(50 * 1024 * 1024, 0xA5);
    let mut file = fs::File::create(&path).expect("create");
    file.write_all(&bytes).expect("write");
    drop(file);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");

    let mut samples = Vec::new();
    for _ in 0..5 {
        let process = Spawn::new(&path).arg("60").spawn();
        // A fresh attestor has an empty cache: every round hashes the whole file.
        let attestor = Attestor::new(AttestOptions::default());
        let start = Instant::now();
        attestor.attest(process.pid()).expect("attest big binary");
        samples.push(start.elapsed());
    }
    samples.sort();
    println!(
        "first attestation, 50 MB binary: {:?} median of 5 (target <= 60ms)",
        samples[2]
    );
    let _ = fs::remove_dir_all(&dir);
}

/// A policy with `rules` exact allow rules between `rules` distinct pairs of workloads.
fn policy_text(rules: usize) -> String {
    let mut text = String::from("trust_domain = \"bench.local\"\n");
    for i in 0..rules {
        let _ = write!(
            text,
            "[[workload]]\nid = \"spiffe://bench.local/w{i}\"\nselectors = [\"pid:{}\"]\n",
            i + 1
        );
    }
    for i in 0..rules {
        let _ = write!(
            text,
            "[[allow]]\nfrom = \"spiffe://bench.local/w{i}\"\nto = \"spiffe://bench.local/w{}\"\nports = [{}]\n",
            (i + 1) % rules,
            1000 + i % 100
        );
    }
    text
}

/// Decisions per second against a policy of `rules` rules, asking about the first `queried`
/// pairs of workloads round-robin.
fn decisions_per_second(rules: usize, queried: usize) -> f64 {
    let (policy, _) = policy::parse("bench.toml", policy_text(rules).as_bytes()).expect("policy");
    let authorizer = Authorizer::new(&policy);
    let ids: Vec<SpiffeId> = (0..rules)
        .map(|i| format!("spiffe://bench.local/w{i}").parse().expect("id"))
        .collect();
    let ports: Vec<u16> = (1000..1100).collect();
    let rounds: u32 = 200_000;
    let start = Instant::now();
    for (n, port) in (0..rounds as usize).zip(ports.iter().cycle()) {
        let i = n % queried;
        black_box(authorizer.decide(&ids[i], &ids[(i + 1) % rules], *port));
    }
    f64::from(rounds) / start.elapsed().as_secs_f64()
}

/// The ratio isolates policy size: both runs ask about the same 10 pairs. A third figure asks
/// about 10,000 distinct pairs, which adds the cost of a working set that leaves the CPU caches.
fn authorization() {
    let rounds = |rules, queried| {
        let samples: Vec<f64> = (0..5)
            .map(|_| decisions_per_second(rules, queried))
            .collect();
        median(&samples)
    };
    let small = rounds(10, 10);
    let large = rounds(10_000, 10);
    let spread = rounds(10_000, 10_000);
    println!(
        "authorization, same 10 queried pairs: {large:.0}/s with 10,000 rules, {small:.0}/s with 10 rules: ratio {:.3} (target >= 0.95)",
        large / small
    );
    println!("authorization, 10,000 distinct pairs against 10,000 rules: {spread:.0}/s");
}

fn compile_and_diff() {
    let text = policy_text(10_000);
    let edited = text.replace("ports = [1000]", "ports = [1001]");
    let mut samples: Vec<Duration> = Vec::new();
    for _ in 0..5 {
        let (old, _) = policy::parse("old.toml", text.as_bytes()).expect("old");
        let (new, _) = policy::parse("new.toml", edited.as_bytes()).expect("new");
        let start = Instant::now();
        let first = compile(&old, None, 1);
        let second = compile(&new, Some(&first.numbers), 2);
        let diff = policy::diff(&old, &new);
        black_box((second, diff));
        samples.push(start.elapsed());
    }
    samples.sort();
    println!(
        "compile + recompile + diff, 10,000 rules: {:?} median of 5 (target <= 100ms)",
        samples[2]
    );
}
