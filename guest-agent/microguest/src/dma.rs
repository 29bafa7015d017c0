//! Memory shared with devices: a page-aligned bump allocator over the largest free RAM range
//! above the image. Everything is identity mapped, so an allocation's address is both the
//! pointer ring 3 uses and the guest-physical address a device is given. Nothing is ever freed:
//! a program allocates what it needs once and the VM ends with the program.
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch;
use crate::bootinfo::BootInfo;

pub const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// End of the boot page tables' identity map.
const IDENTITY_MAP_END: u64 = 16 << 30;

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// Prepares the allocator from the memory map; later calls keep the existing state. Returns
/// the number of bytes available.
pub fn init(boot: &BootInfo) -> u64 {
    if END.load(Ordering::Acquire) == 0 {
        // Like memtouch: leave the first 2 MiB after the image alone.
        let floor = (arch::image_end() + 2 * MIB).next_multiple_of(2 * MIB);
        if let Some(range) = boot.largest_free_range_above(floor) {
            let start = range.start.next_multiple_of(PAGE);
            let end = range.end().min(IDENTITY_MAP_END) & !(PAGE - 1);
            if end > start {
                NEXT.store(start, Ordering::Relaxed);
                END.store(end, Ordering::Release);
            }
        }
    }
    END.load(Ordering::Acquire).saturating_sub(NEXT.load(Ordering::Acquire))
}

/// Allocates `bytes` (rounded up to whole pages), zeroed and page aligned. Returns its
/// address, or `None` when RAM is exhausted or [`init`] found none.
pub fn alloc(bytes: u64) -> Option<u64> {
    let size = bytes.max(1).checked_next_multiple_of(PAGE)?;
    let end = END.load(Ordering::Acquire);
    let addr = NEXT
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| next.checked_add(size).filter(|&n| n <= end))
        .ok()?;
    // SAFETY: the range is usable RAM from the firmware map, identity mapped, above our image
    // and handed out only once.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, size as usize) };
    Some(addr)
}

/// Plain integers, for which all-zero bytes are a valid value.
pub trait Zeroable: Copy {}
impl Zeroable for u8 {}
impl Zeroable for u16 {}
impl Zeroable for u32 {}
impl Zeroable for u64 {}

/// Allocates a zeroed array of `len` integers that lives for the rest of the program.
pub fn alloc_slice<T: Zeroable>(len: usize) -> Option<&'static mut [T]> {
    let bytes = (len as u64).checked_mul(size_of::<T>() as u64)?;
    let addr = alloc(bytes)?;
    // SAFETY: freshly allocated, zeroed, page aligned (enough for any integer) and never
    // handed out again; all-zero is a valid `T`.
    Some(unsafe { core::slice::from_raw_parts_mut(addr as *mut T, len) })
}
