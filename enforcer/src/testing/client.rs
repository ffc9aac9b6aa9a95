//! A scriptable workload: `python3` running [`SCRIPT`], driven one command per line on stdin.
//! Tests, the demo and the benchmarks use it as the "application" inside enrolled cgroups.

use std::time::Duration;

use super::{Netns, ScratchCgroup, Spawn, Spawned};

/// The client program (see the comment at its top for the commands).
const SCRIPT: &str = include_str!("client.py");

/// How long one command may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// A running [`SCRIPT`] process.
pub struct Client {
    process: Spawned,
}

impl Client {
    /// Start the client in `cgroup` (and `netns`, if given).
    #[must_use]
    pub fn start(cgroup: Option<&ScratchCgroup>, netns: Option<&Netns>) -> Self {
        let mut spawn = Spawn::new("python3")
            .args(["-u", "-c", SCRIPT])
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
        // Launchers (pyenv shims) exec several times before the interpreter runs; the kernel
        // revokes identities on exec, so callers must not attest the client before this line.
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
        self.next_line()
    }

    /// The next line the client prints (answers and `accepted` notices).
    pub fn next_line(&mut self) -> String {
        match self.process.read_line(ANSWER_TIMEOUT) {
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
