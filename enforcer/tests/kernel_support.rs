//! Whether the running kernel carries the datapath, asserted exactly both ways: on a kernel at
//! least as new as every [`Feature`], the datapath installs; on an older one, both
//! `Datapath::install` and `enforcer run` refuse, naming the first feature the release
//! predates (the oldest missing one, since features are probed oldest first).
//!
//! `cargo xtask vm-test` runs this suite on every kernel it boots, and on a kernel below the
//! minimum (Debian bullseye's 5.10) only this suite. It reads the line the test prints last:
//! `VMTEST-ACCEPTED <release>` or `VMTEST-REFUSED <feature>`, and fails a kernel whose line is
//! missing or not the one its series calls for.
#![expect(
    unused_crate_dependencies,
    reason = "integration tests use the library, not every dependency"
)]

use std::{
    fs::{self, File},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    kernel::{Feature, FeatureError, KernelVersion, LoadError},
    report::report,
    testing::{Netns, ScratchCgroup, ScratchDatapath, require_root, serial, unique_name},
};

/// Where the running kernel's release is read from.
const OSRELEASE: &str = "/proc/sys/kernel/osrelease";
/// How long `enforcer run` may take to refuse (the guests run under TCG).
const DAEMON_REFUSAL_TIMEOUT: Duration = Duration::from_mins(1);

#[test]
fn the_datapath_installs_or_is_refused_for_the_first_missing_feature() {
    require_root();
    let _serial = serial();
    let release = fs::read_to_string(OSRELEASE)
        .unwrap_or_else(|error| panic!("failed to read {OSRELEASE}: {error}"))
        .trim()
        .to_owned();
    let version = KernelVersion::parse(&release)
        .unwrap_or_else(|| panic!("the release {release:?} does not start with major.minor"));
    match first_feature_newer_than(version) {
        None => {
            assert_installs(&release);
            println!("VMTEST-ACCEPTED {release}");
        }
        Some(feature) => {
            let refusal = FeatureError::Missing {
                release: release.clone(),
                feature,
                since: feature.since(),
            }
            .to_string();
            assert_install_refused(&release, feature, &refusal);
            assert_daemon_refuses(&refusal);
            println!("VMTEST-REFUSED {feature}");
        }
    }
}

/// The oldest feature (in probe order) that arrived after `version`: the one a kernel of that
/// release, without backports, is refused for.
fn first_feature_newer_than(version: KernelVersion) -> Option<Feature> {
    Feature::ALL
        .into_iter()
        .find(|feature| feature.since() > version)
}

/// The kernel has every feature by its release: the programs load, attach and pin.
fn assert_installs(release: &str) {
    let scope = ScratchCgroup::new("support");
    let installed = ScratchDatapath::try_install_in(&scope, &Netns::new("support"), |_| {});
    if let Err(error) = installed {
        panic!(
            "kernel {release} is at least Linux {} by its release, yet the datapath was \
             refused: {}",
            minimum(),
            report(&error)
        );
    }
}

/// The kernel predates `feature`: installing fails on exactly that feature, before anything is
/// loaded, with `refusal` as its message.
fn assert_install_refused(release: &str, feature: Feature, refusal: &str) {
    let scope = ScratchCgroup::new("support");
    match ScratchDatapath::try_install_in(&scope, &Netns::new("support"), |_| {}) {
        Ok(_) => panic!(
            "kernel {release} predates {feature} (Linux {}), yet the datapath installed; a \
             backport would explain it, and then the table in enforcer/src/kernel/features.rs \
             no longer describes this kernel",
            feature.since()
        ),
        Err(LoadError::Kernel(FeatureError::Missing {
            release: reported,
            feature: missing,
            since,
        })) => {
            assert_eq!(
                (reported.as_str(), missing, since),
                (release, feature, feature.since()),
                "refused for another feature than the first one the release predates"
            );
        }
        Err(other) => panic!(
            "expected the refusal \"{refusal}\", got: {}",
            report(&other)
        ),
    }
    println!("kernel_support: Datapath::install refused: {refusal}");
}

/// `enforcer run` refuses to start with the same message, naming the feature.
fn assert_daemon_refuses(refusal: &str) {
    let scope = ScratchCgroup::new("support-daemon");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("enforcer.toml");
    fs::write(
        &config,
        format!(
            "node_name = \"support\"\nstate_dir = \"{state}\"\ncontrol_socket = \"{socket}\"\n\
             metrics_addr = \"\"\n[kernel]\npin_dir = \"/sys/fs/bpf/{pins}\"\n\
             scope_cgroup = \"{scope}\"\n[workload_api]\nsocket = \"{api}\"\n",
            state = dir.path().join("state").display(),
            socket = dir.path().join("control.sock").display(),
            api = dir.path().join("api.sock").display(),
            pins = unique_name("support-daemon"),
            scope = scope.policy_path(),
        ),
    )
    .expect("write the configuration");
    let stderr_path = dir.path().join("stderr");
    let stderr = File::create(&stderr_path).expect("create the stderr file");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start enforcer run");
    let deadline = Instant::now() + DAEMON_REFUSAL_TIMEOUT;
    let status = loop {
        if let Some(status) = daemon.try_wait().expect("wait for enforcer run") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            let _ = daemon.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let logged = fs::read_to_string(&stderr_path).expect("read the daemon's stderr");
    let expected = format!("error: failed to install the datapath: {refusal}");
    match status {
        None => panic!(
            "enforcer run was still running after {DAEMON_REFUSAL_TIMEOUT:?} instead of \
             refusing the kernel; stderr:\n{logged}"
        ),
        Some(status) => assert!(
            !status.success() && logged.lines().any(|line| line == expected),
            "enforcer run should exit non-zero with \"{expected}\"; it exited with {status}, \
             stderr:\n{logged}"
        ),
    }
    println!("kernel_support: enforcer run refused: {expected}");
}

/// The oldest release with every feature.
fn minimum() -> KernelVersion {
    Feature::ALL
        .into_iter()
        .map(Feature::since)
        .max()
        .expect("the feature table is not empty")
}
