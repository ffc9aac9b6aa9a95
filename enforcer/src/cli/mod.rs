//! Command-line interface of the `enforcer` binary: one module per area.

mod api;
mod audit;
mod control;
mod datapath;
mod identity;
mod policy;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, parser::ValueSource};

use crate::config::DEFAULT_PIN_DIR;

pub use api::{ApiCommand, FetchKind, ValidateKind};
pub use audit::AuditCommand;
pub use identity::{BundleCommand, BundleFormat, CaCommand, SvidCommand};
pub use policy::PolicyCommand;

/// Kernel-level workload identity enforcer.
#[derive(Debug, Parser)]
#[command(name = "enforcer", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `enforcer=debug`.
    #[arg(long, global = true, default_value = "info", env = "ENFORCER_LOG")]
    pub log: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "ENFORCER_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The daemon's control socket. For `enforcer api`: the Workload API socket (when not
    /// given here: `SPIFFE_ENDPOINT_SOCKET`, else `/run/enforcer/public/api.sock`).
    #[arg(long, global = true, default_value = crate::config::DEFAULT_CONTROL_SOCKET, env = "ENFORCER_SOCKET")]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: attach the datapath, serve the tunnel, the control API and metrics.
    Run {
        /// Configuration file (TOML); without it the embedded default applies.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show the running daemon's state: attachments, policy version and hash, mode, workloads,
    /// SVIDs and their expiry, counters, lost events. Without a daemon, the pinned datapath's.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The bpffs directory read when no daemon answers.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// The processes of enrolled cgroups: pid, binary, sha256, cgroup, SPIFFE ID, entry.
    Workloads {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The identity-tagged audit trail of flows, newest last.
    Flows {
        /// Keep printing new records as they are written.
        #[arg(long)]
        follow: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// Only records with this verdict (allow, deny, audit, drop, loss, info, redirect).
        #[arg(long)]
        verdict: Option<crate::audit::Verdict>,
        /// Only records whose source or destination is this SPIFFE ID.
        #[arg(long)]
        id: Option<crate::identity::SpiffeId>,
        /// At most this many past records.
        #[arg(long, default_value_t = 200)]
        limit: usize,
    },
    /// Verify audit log files.
    Audit {
        /// What to do with audit logs.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Validate, compare, reload and show policies.
    Policy {
        /// What to do with policies.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Create the trust domain's root CA and node intermediates.
    Ca {
        /// What to do with CAs.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Issue workload X.509-SVIDs, or show the daemon's.
    Svid {
        /// What to do with SVIDs.
        #[command(subcommand)]
        command: SvidCommand,
    },
    /// Print trust bundles.
    Bundle {
        /// What to do with bundles.
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Call the SPIFFE Workload API as this process: fetch SVIDs, validate JWT-SVIDs, watch
    /// rotations.
    Api {
        /// What to call.
        #[command(subcommand)]
        command: ApiCommand,
    },
    /// Detach every program and remove every pin of the datapath.
    Uninstall {
        /// The daemon's bpffs directory.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Entry point of the binary.
#[must_use]
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let socket_given = matches.value_source("socket") == Some(ValueSource::CommandLine);
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli.command, &cli.socket, socket_given) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `command`; `socket` is the `--socket` value, `socket_given` whether the command line
/// named it (for `api`, which otherwise reads `SPIFFE_ENDPOINT_SOCKET`).
fn run(command: Command, socket: &std::path::Path, socket_given: bool) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let config = crate::config::Config::load(config.as_deref())?;
            crate::app::run(config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, pin_dir } => match control::status(socket, json) {
            Err(error)
                if error
                    .downcast_ref::<crate::control::ClientError>()
                    .is_some_and(|e| {
                        matches!(
                            e,
                            crate::control::ClientError::NotRunning { .. }
                                | crate::control::ClientError::Refused { .. }
                        )
                    }) =>
            {
                println!("daemon: not running ({error})");
                datapath::status(&pin_dir)?;
                Ok(ExitCode::FAILURE)
            }
            other => other,
        },
        Command::Workloads { json } => control::workloads(socket, json),
        Command::Flows {
            follow,
            json,
            verdict,
            id,
            limit,
        } => control::flows(
            socket,
            &control::FlowsQuery {
                follow,
                json,
                verdict,
                id,
                limit,
            },
        ),
        Command::Audit { command } => Ok(command.run()),
        Command::Policy { command } => command.run(socket),
        Command::Ca { command } => command.run().map(|()| ExitCode::SUCCESS),
        Command::Svid { command } => command.run(socket),
        Command::Bundle { command } => command.run().map(|()| ExitCode::SUCCESS),
        Command::Uninstall { pin_dir } => datapath::uninstall(&pin_dir).map(|()| ExitCode::SUCCESS),
        Command::Api { command } => command.run(socket_given.then_some(socket)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::audit::Verdict;

    #[test]
    fn flows_filters_by_every_verdict_redirect_included() {
        for verdict in Verdict::ALL {
            let cli = Cli::try_parse_from(["enforcer", "flows", "--verdict", verdict.as_str()])
                .unwrap_or_else(|error| panic!("{verdict}: {error}"));
            assert!(
                matches!(cli.command, Command::Flows { verdict: Some(v), .. } if v == verdict),
                "{verdict}"
            );
        }
        let error = Cli::try_parse_from(["enforcer", "flows", "--verdict", "redirected"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("expected one of allow, deny, audit, drop, loss, info, redirect"),
            "{error}"
        );
    }

    #[test]
    fn audit_verify_takes_a_head_or_no_head_but_not_both() {
        let cli = Cli::try_parse_from([
            "enforcer",
            "audit",
            "verify",
            "--head",
            "/h/audit.head",
            "a.jsonl",
            "a.jsonl.1",
        ])
        .unwrap();
        let Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    head,
                    no_head,
                },
        } = cli.command
        else {
            panic!("not audit verify: {cli:?}");
        };
        assert_eq!(
            files,
            [PathBuf::from("a.jsonl"), PathBuf::from("a.jsonl.1")]
        );
        assert_eq!(head, Some(PathBuf::from("/h/audit.head")));
        assert!(!no_head);
        assert!(
            Cli::try_parse_from([
                "enforcer",
                "audit",
                "verify",
                "--head",
                "h",
                "--no-head",
                "a.jsonl"
            ])
            .is_err()
        );
    }
}
