//! The `vmm` command: run a VM from flags or a JSON config, control a running one through its
//! API socket, run the bundled demo, or build a Linux guest image.
//!
//! Guest serial output goes to stdout; everything the VMM itself says goes to stderr. Errors
//! are one line, never a panic or a backtrace (flag errors are clap's, with the usage of the
//! subcommand at fault). Exit status: the guest's debug-exit status, 0 for a clean guest
//! shutdown or a stop (`vmm ctl stop`, Ctrl-A x), 1 when the VMM fails or the guest crashes,
//! 2 for bad input, 128 + N when signal N (SIGINT, SIGTERM, SIGHUP) stopped the VM, 159 when a
//! thread made a system call its seccomp filter forbids.

mod cli;
mod console;
mod ctl;
mod demo;
mod logger;
mod sandbox;
mod shadow;
mod swarm;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, Failure};

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        // One line, no backtrace: a panic is a VMM bug, reported as such.
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        console::restore_terminal();
        eprintln!("error: internal error (please report): {message}{location}");
    }));

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::report_clap_error(e),
    };
    logger::init(cli.log_level);
    let result = match cli.command {
        Command::Run(args) => cli::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::ExportMicroguest { path } => cli::export_microguest(&path),
        Command::Image(args) => cli::image(&args),
        Command::Ctl(args) => ctl::run(&args),
        Command::Completions { shell } => cli::completions(shell),
        Command::Man { out } => cli::man(&out),
        Command::Shadow(args) => shadow::run(&args),
        Command::Swarm(args) => swarm::run(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(Failure { status, error }) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::from(status)
        }
    }
}

/// The error and its causes on one line, each cause once: most of our errors already name
/// their cause in their message (`{:#}` would repeat it).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}
