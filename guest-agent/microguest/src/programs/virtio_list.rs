//! `prog=virtio-list`: probes every `virtio_mmio.device=` entry on the command line and
//! prints what each window holds, without initializing anything.
use super::{Context, Failure, Outcome, Program};
use crate::println;
use crate::virtio::{self, Error};

pub const PROGRAM: Program =
    Program { name: "virtio-list", about: "list the virtio-mmio devices named on the command line", run };

fn run(ctx: &Context) -> Outcome {
    const P: &str = "virtio-list";
    let (mut described, mut present, mut malformed) = (0u64, 0u64, 0u64);
    for (i, desc) in virtio::descriptions(ctx.args).enumerate() {
        described += 1;
        let desc = match desc {
            Ok(d) => d,
            Err(text) => {
                println!("{P}: entry {i}: malformed {}={text:?}", virtio::CMDLINE_KEY);
                malformed += 1;
                continue;
            }
        };
        match virtio::probe(desc) {
            Ok(p) if p.device_id == 0 => {
                println!("{P}: {:#x}: placeholder (device id 0)", desc.base);
            }
            Ok(p) => {
                present += 1;
                let kind = match p.version {
                    2 => "virtio 1.x",
                    1 => "legacy (unsupported)",
                    _ => "unknown version",
                };
                println!(
                    "{P}: {:#x} size {:#x} irq {}{}: {} {} (device id {}, version {}, vendor \
                     {:#x})",
                    desc.base,
                    desc.size,
                    desc.irq,
                    IdSuffix(desc.id),
                    kind,
                    virtio::device_name(p.device_id),
                    p.device_id,
                    p.version,
                    p.vendor_id
                );
            }
            Err(e @ Error::BadMagic { .. }) | Err(e @ Error::BadWindow { .. }) => {
                println!("{P}: {e}");
            }
            Err(e) => println!("{P}: {:#x}: {e}", desc.base),
        }
    }
    println!("{P}: {described} described, {present} present");
    if malformed != 0 {
        return Err(Failure::Usage);
    }
    Ok(())
}

struct IdSuffix(Option<i64>);

impl core::fmt::Display for IdSuffix {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(id) => write!(f, " id {id}"),
            None => Ok(()),
        }
    }
}
