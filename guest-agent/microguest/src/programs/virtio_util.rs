//! Helpers shared by the virtio test programs.
use super::{Context, Failure, usage};
use crate::virtio::{self, Transport};
use crate::{arch, dma, println, time};

/// Finds device number `key=` (default 0) of type `device_id` and prepares DMA memory.
pub fn find_device(ctx: &Context, program: &str, key: &'static str, device_id: u32) -> Result<Transport, Failure> {
    let index = ctx.args.u64_in(key, 0, 0, 63).map_err(|e| usage(program, e))?;
    if dma::init(ctx.boot) == 0 {
        println!("{program}: no free RAM above the image for virtqueues and buffers");
        return Err(Failure::Check);
    }
    virtio::find(ctx.args, device_id, index).map_err(|e| {
        println!("{program}: FAILED: {e}");
        Failure::Check
    })
}

/// A `timeout_ms=` argument (default `default`).
pub fn timeout_ms(ctx: &Context, program: &str, default: u64) -> Result<u64, Failure> {
    ctx.args.u64_in("timeout_ms", default, 1, 3_600_000).map_err(|e| usage(program, e))
}

/// `seed=` if given, else something different on every run.
pub fn seed(ctx: &Context, program: &str) -> Result<u64, Failure> {
    let fresh = mix(arch::rdtsc());
    ctx.args.u64_in("seed", fresh, 0, u64::MAX).map_err(|e| usage(program, e))
}

/// A 64-bit finalizer (splitmix64's): spreads every input bit over the output.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A small fast generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Writes a byte count as "N MiB" when whole, else "N KiB" or "N bytes".
pub struct Size(pub u64);

impl core::fmt::Display for Size {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let b = self.0;
        if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{} KiB", b >> 10)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

/// `count` events over the TSC interval `start..end`, per second, if the frequency is known.
pub fn per_second(count: u64, start: u64, end: u64) -> Option<u64> {
    let khz = time::tsc_khz()?;
    let ticks = end.wrapping_sub(start).max(1);
    Some((u128::from(count) * u128::from(khz) * 1000 / u128::from(ticks)) as u64)
}

/// Mean of `total_ticks` over `count` in tenths of a microsecond, if the frequency is known.
pub fn mean_tenth_us(total_ticks: u64, count: u64) -> Option<u64> {
    let khz = time::tsc_khz()?;
    Some((u128::from(total_ticks) * 10_000 / (u128::from(khz) * u128::from(count.max(1)))) as u64)
}

/// A periodic check inside a busy loop, timed with the TSC.
pub struct Every {
    last: u64,
    ticks: u64,
}

impl Every {
    /// Every `ms` milliseconds (of an assumed 4 GHz TSC when the frequency is unknown).
    pub fn ms(ms: u64) -> Every {
        Every { last: arch::rdtsc(), ticks: time::ticks_for_ms(ms) }
    }

    /// When a period has passed since the last time this said so (or since creation): the
    /// TSC ticks since then. `now` is a current TSC reading.
    pub fn due(&mut self, now: u64) -> Option<u64> {
        let elapsed = now.wrapping_sub(self.last);
        (elapsed >= self.ticks).then(|| {
            self.last = now;
            elapsed
        })
    }
}

/// `progress_ms=` (default 1000; 0 turns progress lines off): the progress period in
/// milliseconds, if the TSC frequency is known.
pub fn progress_ms(ctx: &Context, program: &str) -> Result<Option<u64>, Failure> {
    let ms = ctx.args.u64_in("progress_ms", 1000, 0, 3_600_000).map_err(|e| usage(program, e))?;
    Ok((ms > 0 && time::tsc_khz().is_some()).then_some(ms))
}

/// How often a long run looks at the serial port: each look is a VM exit, so not per request.
const INPUT_POLL_MS: u64 = 10;

/// Watches the serial port, about every 10 ms, for the byte that ends an `until_input=1` run.
pub struct InputPoll(Every);

impl InputPoll {
    pub fn new() -> InputPoll {
        InputPoll(Every::ms(INPUT_POLL_MS))
    }

    /// Whether a byte arrived (looks only when the period has passed).
    pub fn arrived(&mut self, now: u64) -> bool {
        self.0.due(now).is_some() && crate::console::try_read_byte().is_some()
    }
}

/// `until_input=1` or `NAME=N` (default `default`, at most `max`): how a stress run ends.
#[derive(Clone, Copy)]
pub enum Limit {
    Count(u64),
    UntilInput,
}

pub fn limit(ctx: &Context, program: &str, name: &'static str, default: u64, max: u64) -> Result<Limit, Failure> {
    let until_input = ctx.args.u64_in("until_input", 0, 0, 1).map_err(|e| usage(program, e))? == 1;
    if until_input && ctx.args.get(name).is_some() {
        println!("{program}: give either {name}=N or until_input=1, not both");
        return Err(Failure::Usage);
    }
    if until_input {
        return Ok(Limit::UntilInput);
    }
    Ok(Limit::Count(ctx.args.u64_in(name, default, 1, max).map_err(|e| usage(program, e))?))
}
