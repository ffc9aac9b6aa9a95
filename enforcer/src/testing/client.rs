//! A scriptable workload: `python3` running [`SCRIPT`], driven one command per line on stdin.
//! Tests, the demo and the benchmarks use it as the "application" inside enrolled cgroups.

use std::time::Duration;

use super::{Netns, ScratchCgroup, Spawn, Spawned};

/// The client program (see the comment at its top for the commands).
const SCRIPT: &str = include_str!("client.py");

/// How long one command may take to answer, beyond the time its connects may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the script lets one connect take before giving up (`settimeout` in [`SCRIPT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest `command` may take to answer: `connect_many N` makes N connects in a row, each
/// bounded by the script's own timeout (slow kernels under emulation need all of it).
fn answer_timeout(command: &str) -> Duration {
    let connects = command
        .strip_prefix("connect_many ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(1);
    ANSWER_TIMEOUT + CONNECT_TIMEOUT * connects
}

/// The system's Python, outside any home directory, so that every user can run it.
const PYTHON: &str = "/usr/bin/python3";

/// Who the client runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persona {
    /// root, with every capability.
    Root,
    /// `nobody` (uid and gid 65534), without any capability.
    Nobody,
    /// `nobody` holding exactly one capability, `CAP_NET_RAW` (raw sockets, `SO_MARK`).
    NetRaw,
}

impl Persona {
    /// The `setpriv` arguments that make a process this persona before it runs the client.
    fn setpriv(self) -> &'static [&'static str] {
        match self {
            Self::Root => &[],
            Self::Nobody => &[
                "/usr/bin/setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ],
            Self::NetRaw => &[
                "/usr/bin/setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all,+net_raw",
                "--ambient-caps=-all,+net_raw",
                "--bounding-set=-all,+net_raw",
            ],
        }
    }
}

/// A running [`SCRIPT`] process.
pub struct WorkloadClient {
    process: Spawned,
}

impl WorkloadClient {
    /// Start the client as root in `cgroup` (and `netns`, if given).
    #[must_use]
    pub fn start(cgroup: Option<&ScratchCgroup>, netns: Option<&Netns>) -> Self {
        Self::start_as(Persona::Root, cgroup, netns)
    }

    /// Start the client as `persona` in `cgroup` (and `netns`, if given).
    #[must_use]
    pub fn start_as(
        persona: Persona,
        cgroup: Option<&ScratchCgroup>,
        netns: Option<&Netns>,
    ) -> Self {
        let mut argv = persona.setpriv().to_vec();
        argv.extend([PYTHON, "-u", "-c", SCRIPT]);
        // A clean environment: what cargo sets for its children (`LD_LIBRARY_PATH`) would keep
        // a `unix:sha256` entry from vouching for the client or for what it execs.
        let mut spawn = Spawn::new(argv[0])
            .args(&argv[1..])
            .env_clear()
            .stdin_piped();
        if let Some(cgroup) = cgroup {
            spawn = spawn.cgroup(cgroup);
        }
        if let Some(netns) = netns {
            spawn = spawn.netns(netns);
        }
        let mut client = Self {
            process: spawn.spawn(),
        };
        // `setpriv` execs the interpreter; the kernel revokes identities on exec, so callers
        // must not attest the client before this line.
        let ready = client.next_line();
        assert_eq!(ready, "ready", "unexpected first line from the client");
        client
    }

    /// The client's pid (its tgid, as the kernel sees it).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Send one command and return its one-line answer; panics (with the client's stderr) when
    /// none comes.
    pub fn ask(&mut self, command: &str) -> String {
        self.process.write_line(command);
        self.next_line_within(answer_timeout(command))
    }

    /// The next line the client prints (answers and `accepted` notices).
    pub fn next_line(&mut self) -> String {
        self.next_line_within(answer_timeout(""))
    }

    /// The next line the client prints within `timeout`, if any (to show that nothing came).
    pub fn try_next_line(&mut self, timeout: Duration) -> Option<String> {
        self.process.read_line(timeout)
    }

    fn next_line_within(&mut self, timeout: Duration) -> String {
        match self.process.read_line(timeout) {
            Some(line) => line,
            None => panic!(
                "client {} did not answer; stderr:\n{}",
                self.pid(),
                self.process.stderr()
            ),
        }
    }

    /// Send a command without waiting for an answer (for `exec`).
    pub fn send(&mut self, command: &str) {
        self.process.write_line(command);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_time_covers_every_connect_of_connect_many() {
        assert_eq!(
            answer_timeout("connect 127.0.0.1 80"),
            Duration::from_secs(22)
        );
        assert_eq!(
            answer_timeout("connect_many 200 127.0.0.1 80"),
            Duration::from_mins(7)
        );
    }
}
