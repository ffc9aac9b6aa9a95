//! The `enforcer` binary: parses the command line and hands over to the library.
#![expect(
    unused_crate_dependencies,
    reason = "the binary is a thin wrapper; the library crate uses the dependencies"
)]

fn main() -> std::process::ExitCode {
    enforcer::cli::main()
}
