//! `prog=hello`: proves the guest booted, and reports what it was told.
use super::{Context, Outcome, Program};
use crate::println;

pub const PROGRAM: Program = Program { name: "hello", about: "print a greeting and boot facts", run };

fn run(ctx: &Context) -> Outcome {
    let cpus = crate::smp::discover_cpus().map_or(1, |c| c.count);
    println!(
        "hello: Hello from the microguest! boot={} ram={}MiB cpus={} tsc_khz={} cmdline=\"{}\"",
        ctx.boot.protocol.name(),
        ctx.boot.ram_bytes() >> 20,
        cpus,
        crate::time::tsc_khz().unwrap_or(0),
        ctx.boot.cmdline()
    );
    Ok(())
}
