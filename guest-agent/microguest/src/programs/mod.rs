//! The program registry. A program is a name, a one-line description and a function; add one
//! by writing a module with a `PROGRAM` constant and listing it in [`PROGRAMS`].
use microguest_protocol::status;

use crate::bootinfo::BootInfo;
use crate::cmdline::Args;
use crate::println;

mod blk;
mod blk_stress;
mod hello;
mod idle;
mod memdirty;
mod memtouch;
mod net;
mod net_reflect;
mod net_stream;
mod platform;
mod ring;
mod ring_garbage;
mod smp;
mod swarm_worker;
mod virtio_list;
mod virtio_util;
mod vsock;

/// What a program gets to work with.
pub struct Context<'a> {
    pub args: &'a Args<'a>,
    pub boot: &'a BootInfo,
}

/// How a program ended, when not in success.
pub enum Failure {
    /// A check failed (exit status 1).
    Check,
    /// Bad arguments (exit status 2).
    Usage,
}

pub type Outcome = Result<(), Failure>;

pub struct Program {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Context) -> Outcome,
}

pub static PROGRAMS: &[Program] = &[
    hello::PROGRAM,
    idle::PROGRAM,
    memtouch::PROGRAM,
    memdirty::PROGRAM,
    smp::PROGRAM,
    platform::RESET,
    platform::UNHANDLED,
    virtio_list::PROGRAM,
    blk::RW,
    blk::BENCH,
    blk_stress::STRESS,
    net::ECHO,
    net_stream::STREAM,
    net_reflect::REFLECT,
    vsock::ECHO,
    ring::PAIR,
    swarm_worker::WORKER,
    ring_garbage::GARBAGE,
];

const DEFAULT_PROGRAM: &str = "hello";

/// Runs the program named by `prog=` and returns the exit status.
pub fn run(args: &Args, boot: &BootInfo) -> u32 {
    let name = args.get("prog").unwrap_or(DEFAULT_PROGRAM);
    let Some(program) = PROGRAMS.iter().find(|p| p.name == name) else {
        println!("microguest: unknown program {name:?}; available programs:");
        for p in PROGRAMS {
            println!("  {:<12} {}", p.name, p.about);
        }
        return status::USAGE;
    };
    match (program.run)(&Context { args, boot }) {
        Ok(()) => status::SUCCESS,
        Err(Failure::Check) => status::FAILURE,
        Err(Failure::Usage) => status::USAGE,
    }
}

/// Prints a bad-argument message and returns the usage failure.
pub fn usage(program: &str, err: crate::cmdline::BadArg) -> Failure {
    println!("{program}: {err}");
    Failure::Usage
}
