//! How guest pages travel to a shadow: each dirty page becomes the smallest of
//! - **zero**: a flag (a page of zeros);
//! - **same as**: the offset of a page the shadow already holds with these bytes (dedup by
//!   content hash, confirmed byte for byte against the copy the encoder kept, so a hash
//!   collision can never substitute a page);
//! - **delta**: the XOR with the version last sent for this page, as runs of unchanged bytes
//!   and literal bytes (what XBZRLE does), when the encoder still has that version;
//! - **full**: the page as it is.
//!
//! A batch of records is then LZ4-compressed when that makes it smaller. The encoder keeps a
//! bounded cache of the versions it sent (for deltas and dedup); the decoder needs none, since
//! it applies records to the shadow's own copy of guest memory.

use twox_hash::XxHash3_64;

/// Maps keyed by page offsets and content hashes.
type FastMap<K, V> = foldhash::HashMap<K, V>;

/// Guest page size.
pub const PAGE: usize = 4096;

const ZERO: u8 = 0;
const FULL: u8 = 1;
const DELTA: u8 = 2;
const SAME: u8 = 3;

/// The most bytes of records a batch decompresses to (a batch of 64 Ki pages sent whole).
const MAX_RECORDS: usize = (64 << 10) * (PAGE + 16);

/// Batch flags.
const RAW: u8 = 0;
const LZ4: u8 = 1;

/// What encoding one batch cost and saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodecStats {
    /// Pages in the batch.
    pub pages: u64,
    /// Of which zero pages, sent as a flag.
    pub zero: u64,
    /// Of which pages the shadow already held elsewhere, sent as an offset.
    pub same: u64,
    /// Of which pages sent as a delta against their last version.
    pub delta: u64,
    /// Of which pages sent whole.
    pub full: u64,
    /// The pages' size: what a plain copy would send.
    pub raw_bytes: u64,
    /// What the batch took on the wire.
    pub sent_bytes: u64,
}

impl CodecStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &CodecStats) {
        self.pages += other.pages;
        self.zero += other.zero;
        self.same += other.same;
        self.delta += other.delta;
        self.full += other.full;
        self.raw_bytes += other.raw_bytes;
        self.sent_bytes += other.sent_bytes;
    }
}

/// The primary's side: turns pages into a batch.
pub struct Encoder {
    /// The last version sent of recently sent pages, by guest memory offset, at most
    /// `capacity` of them (the oldest go first).
    sent: FastMap<u64, Box<[u8]>>,
    order: std::collections::VecDeque<u64>,
    capacity: usize,
    /// Content hash -> an offset whose page, as the shadow holds it, has that content.
    by_hash: FastMap<u64, u64>,
    /// Offset -> the hash `by_hash` files it under.
    hash_of: FastMap<u64, u64>,
    batch: Vec<u8>,
    stats: CodecStats,
}

impl Encoder {
    /// An encoder keeping at most `cache_pages` sent pages for deltas and dedup.
    pub fn new(cache_pages: usize) -> Self {
        Self {
            sent: FastMap::default(),
            order: Default::default(),
            capacity: cache_pages,
            by_hash: FastMap::default(),
            hash_of: FastMap::default(),
            batch: vec![RAW],
            stats: CodecStats::default(),
        }
    }

    /// Adds the page at guest memory offset `at` (a multiple of [`PAGE`]) to the batch.
    pub fn page(&mut self, at: u64, bytes: &[u8]) {
        debug_assert_eq!(bytes.len(), PAGE);
        self.stats.pages += 1;
        self.stats.raw_bytes += PAGE as u64;
        if is_zero(bytes) {
            self.forget_hash(at);
            self.remember(at, bytes);
            self.batch.push(ZERO);
            put_varint(&mut self.batch, at);
            self.stats.zero += 1;
            return;
        }
        let hash = XxHash3_64::oneshot(bytes);
        if let Some(&from) = self.by_hash.get(&hash)
            && from != at
            && self.sent.get(&from).is_some_and(|page| **page == *bytes)
        {
            self.forget_hash(at);
            self.remember(at, bytes);
            self.file_hash(at, hash);
            self.batch.push(SAME);
            put_varint(&mut self.batch, at);
            put_varint(&mut self.batch, from);
            self.stats.same += 1;
            return;
        }
        let delta = self.sent.get(&at).and_then(|old| xor_runs(old, bytes, PAGE / 2));
        self.forget_hash(at);
        match delta {
            Some(delta) => {
                self.batch.push(DELTA);
                put_varint(&mut self.batch, at);
                put_varint(&mut self.batch, delta.len() as u64);
                self.batch.extend_from_slice(&delta);
                self.stats.delta += 1;
            }
            None => {
                self.batch.push(FULL);
                put_varint(&mut self.batch, at);
                self.batch.extend_from_slice(bytes);
                self.stats.full += 1;
            }
        }
        self.remember(at, bytes);
        self.file_hash(at, hash);
    }

    /// Ends the batch: its bytes for the wire (compressed where that pays) and what it cost.
    pub fn finish(&mut self) -> (Vec<u8>, CodecStats) {
        // The batch starts with a byte kept for its flag: sent raw, it goes as it is.
        let mut batch = std::mem::replace(&mut self.batch, vec![RAW]);
        let records = &batch[1..];
        let out = match worth_compressing(records).then(|| lz4_flex::compress_prepend_size(records)) {
            Some(compressed) if compressed.len() < records.len() => {
                let mut out = Vec::with_capacity(compressed.len() + 1);
                out.push(LZ4);
                out.extend_from_slice(&compressed);
                out
            }
            _ => {
                batch[0] = RAW;
                batch
            }
        };
        let mut stats = std::mem::take(&mut self.stats);
        stats.sent_bytes = out.len() as u64;
        (out, stats)
    }

    fn remember(&mut self, at: u64, bytes: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        if let Some(page) = self.sent.get_mut(&at) {
            page.copy_from_slice(bytes);
            return;
        }
        let mut reuse = None;
        while self.sent.len() >= self.capacity {
            let Some(old) = self.order.pop_front() else { break };
            reuse = self.sent.remove(&old);
            // Without its bytes a page can no longer be confirmed as a dedup source.
            self.forget_hash(old);
        }
        let page = match reuse {
            Some(mut page) => {
                page.copy_from_slice(bytes);
                page
            }
            None => bytes.into(),
        };
        self.sent.insert(at, page);
        self.order.push_back(at);
    }

    fn file_hash(&mut self, at: u64, hash: u64) {
        if self.sent.contains_key(&at) {
            self.by_hash.insert(hash, at);
            self.hash_of.insert(at, hash);
        }
    }

    fn forget_hash(&mut self, at: u64) {
        if let Some(hash) = self.hash_of.remove(&at)
            && self.by_hash.get(&hash) == Some(&at)
        {
            self.by_hash.remove(&hash);
        }
    }
}

/// Why a batch could not be applied: the bytes are not what an [`Encoder`] writes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The batch ends inside a record.
    #[error("truncated batch")]
    Truncated,
    /// A record kind or batch flag no encoder writes.
    #[error("unknown record kind {0}")]
    Kind(u8),
    /// The LZ4 payload does not decompress.
    #[error("corrupt compressed batch: {0}")]
    Lz4(String),
    /// A record names memory outside the guest's, or a misaligned page.
    #[error("page offset {0:#x} is outside guest memory or not page-aligned")]
    Offset(u64),
    /// A delta does not fit in a page.
    #[error("malformed delta for the page at {0:#x}")]
    Delta(u64),
}

/// What the shadow's copy of guest memory must offer a decoder.
pub trait PageStore {
    /// The guest's memory size in bytes.
    fn size(&self) -> u64;
    /// Reads the page at `at`.
    fn read(&mut self, at: u64, page: &mut [u8]);
    /// Writes the page at `at`.
    fn write(&mut self, at: u64, page: &[u8]);
}

/// Applies a batch from [`Encoder::finish`] to `store`, in order; returns the pages written.
pub fn apply(batch: &[u8], store: &mut impl PageStore) -> Result<u64, DecodeError> {
    let (&flag, rest) = batch.split_first().ok_or(DecodeError::Truncated)?;
    let records = match flag {
        RAW => std::borrow::Cow::Borrowed(rest),
        LZ4 => {
            // The size prefix is the peer's word: bounded by what one batch can hold.
            let size = rest.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
            match size {
                Some(size) if size <= MAX_RECORDS => std::borrow::Cow::Owned(
                    lz4_flex::decompress_size_prepended(rest).map_err(|e| DecodeError::Lz4(e.to_string()))?,
                ),
                _ => return Err(DecodeError::Lz4(format!("a batch of {size:?} bytes is over the limit"))),
            }
        }
        other => return Err(DecodeError::Kind(other)),
    };
    let mut input = &records[..];
    let mut page = vec![0u8; PAGE];
    let mut pages = 0;
    let check = |at: u64, size: u64| match at.is_multiple_of(PAGE as u64)
        && at.checked_add(PAGE as u64).is_some_and(|end| end <= size)
    {
        true => Ok(at),
        false => Err(DecodeError::Offset(at)),
    };
    while let Some((&kind, rest)) = input.split_first() {
        input = rest;
        let at = check(get_varint(&mut input)?, store.size())?;
        match kind {
            ZERO => page.fill(0),
            FULL => {
                let bytes = input.get(..PAGE).ok_or(DecodeError::Truncated)?;
                page.copy_from_slice(bytes);
                input = &input[PAGE..];
            }
            DELTA => {
                let len = get_varint(&mut input)? as usize;
                let delta = input.get(..len).ok_or(DecodeError::Truncated)?;
                input = &input[len..];
                store.read(at, &mut page);
                apply_xor_runs(&mut page, delta).ok_or(DecodeError::Delta(at))?;
            }
            SAME => {
                let from = check(get_varint(&mut input)?, store.size())?;
                store.read(from, &mut page);
            }
            other => return Err(DecodeError::Kind(other)),
        }
        store.write(at, &page);
        pages += 1;
    }
    Ok(pages)
}

/// The 8 bytes at `i` as a word (comparing words, not slices: a slice comparison is a call).
#[inline]
fn word(bytes: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[i..i + 8]);
    u64::from_ne_bytes(w)
}

/// Whether a page is all zeros, a word at a time.
fn is_zero(page: &[u8]) -> bool {
    (0..page.len()).step_by(8).all(|i| word(page, i) == 0)
}

/// The number of bytes from `i` on that are equal in `a` and `b`, skipping equal words whole.
fn equal_run(a: &[u8], b: &[u8], mut i: usize) -> usize {
    let start = i;
    while i + 8 <= a.len() && word(a, i) == word(b, i) {
        i += 8;
    }
    while i < a.len() && a[i] == b[i] {
        i += 1;
    }
    i - start
}

/// Whether LZ4 is worth trying on a batch: yes unless a sample of it does not shrink (pages of
/// random bytes: compressing them only costs time).
fn worth_compressing(records: &[u8]) -> bool {
    const SAMPLE: usize = 16 << 10;
    if records.len() <= SAMPLE * 4 {
        return true;
    }
    let middle = records.len() / 2;
    let sample = &records[middle..middle + SAMPLE];
    lz4_flex::compress(sample).len() < SAMPLE * 9 / 10
}

/// `new` as the XOR with `old`, in runs: (unchanged bytes, changed bytes, the changed bytes
/// XORed), each length a varint. None when that would be longer than `limit`.
fn xor_runs(old: &[u8], new: &[u8], limit: usize) -> Option<Vec<u8>> {
    // Most pages either barely changed or changed all over: count changed words first, and
    // give up at once when half of them changed (the delta would hardly be smaller).
    let changed_words = (0..new.len()).step_by(8).filter(|&i| word(old, i) != word(new, i)).count();
    if changed_words * 2 > new.len() / 8 {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < new.len() {
        let same = equal_run(old, new, i);
        let start = i + same;
        if start == new.len() {
            break;
        }
        // A changed run ends at the first stretch of 3 equal bytes (shorter ones are cheaper
        // to carry than to mark).
        let mut end = start;
        while end < new.len() {
            let equal = old[end..].iter().zip(&new[end..]).take(3).take_while(|(a, b)| a == b).count();
            if equal == 3 || end + equal == new.len() {
                break;
            }
            end += 1;
        }
        put_varint(&mut out, same as u64);
        put_varint(&mut out, (end - start) as u64);
        out.extend(old[start..end].iter().zip(&new[start..end]).map(|(a, b)| a ^ b));
        if out.len() > limit {
            return None;
        }
        i = end;
    }
    Some(out)
}

fn apply_xor_runs(page: &mut [u8], mut delta: &[u8]) -> Option<()> {
    let mut i = 0usize;
    while !delta.is_empty() {
        let same = get_varint(&mut delta).ok()? as usize;
        let changed = get_varint(&mut delta).ok()? as usize;
        let start = i.checked_add(same)?;
        let end = start.checked_add(changed)?;
        let bytes = delta.get(..changed)?;
        page.get_mut(start..end)?.iter_mut().zip(bytes).for_each(|(p, x)| *p ^= x);
        delta = &delta[changed..];
        i = end;
    }
    Some(())
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(input: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(DecodeError::Truncated)?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Memory(Vec<u8>);

    impl PageStore for Memory {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&mut self, at: u64, page: &mut [u8]) {
            page.copy_from_slice(&self.0[at as usize..at as usize + PAGE]);
        }
        fn write(&mut self, at: u64, page: &[u8]) {
            self.0[at as usize..at as usize + PAGE].copy_from_slice(page);
        }
    }

    /// A deterministic byte stream (xorshift), so the tests need no randomness crate.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Sends every page of `primary` that differs from `shadow`'s, and checks the shadow ends
    /// up equal.
    fn sync(encoder: &mut Encoder, primary: &[u8], shadow: &mut Memory) -> CodecStats {
        for (i, page) in primary.chunks(PAGE).enumerate() {
            encoder.page((i * PAGE) as u64, page);
        }
        let (batch, stats) = encoder.finish();
        assert_eq!(apply(&batch, shadow).unwrap(), stats.pages);
        assert!(shadow.0 == primary, "the shadow differs from the primary");
        stats
    }

    #[test]
    fn every_kind_of_page_arrives_intact_and_small() {
        let pages = 64;
        let mut primary = noise(1, pages * PAGE);
        primary[..4 * PAGE].fill(0); // zero pages
        let copy = primary[10 * PAGE..11 * PAGE].to_vec();
        primary[20 * PAGE..21 * PAGE].copy_from_slice(&copy); // a duplicate
        let mut shadow = Memory(vec![0xaa; pages * PAGE]);
        let mut encoder = Encoder::new(1024);
        let first = sync(&mut encoder, &primary, &mut shadow);
        assert_eq!((first.zero, first.same), (4, 1), "{first:?}");

        // Sparse writes: a few bytes in every page become deltas far smaller than pages.
        for page in 0..pages {
            primary[page * PAGE + 100] ^= 0x5a;
            primary[page * PAGE + 3000..page * PAGE + 3008].copy_from_slice(b"changed!");
        }
        let second = sync(&mut encoder, &primary, &mut shadow);
        // Pages changed alike stay alike: of the four zero pages the first goes as a delta,
        // the other three as references to it, and page 20 as a reference to page 10.
        assert_eq!((second.delta, second.same), (pages as u64 - 4, 4), "{second:?}");
        assert!(second.sent_bytes * 50 < second.raw_bytes, "{second:?}");

        // A page rewritten whole goes whole; one rewritten to zeros, as a flag.
        primary[30 * PAGE..31 * PAGE].copy_from_slice(&noise(9, PAGE));
        primary[31 * PAGE..32 * PAGE].fill(0);
        let third = sync(&mut encoder, &primary, &mut shadow);
        assert_eq!((third.full, third.zero), (1, 1), "{third:?}");
    }

    #[test]
    fn dedup_never_points_at_a_page_that_changed_since() {
        let mut primary = noise(3, 4 * PAGE);
        let a = primary[..PAGE].to_vec();
        primary[PAGE..2 * PAGE].copy_from_slice(&a);
        let mut shadow = Memory(vec![0; 4 * PAGE]);
        let mut encoder = Encoder::new(16);
        sync(&mut encoder, &primary, &mut shadow);
        // Page 0 changes; a later copy of its old content must not refer to it.
        primary[..PAGE].copy_from_slice(&noise(4, PAGE));
        primary[2 * PAGE..3 * PAGE].copy_from_slice(&a);
        sync(&mut encoder, &primary, &mut shadow);
    }

    #[test]
    fn a_tiny_cache_still_sends_correct_pages() {
        let mut primary = noise(5, 32 * PAGE);
        let mut shadow = Memory(vec![0; 32 * PAGE]);
        let mut encoder = Encoder::new(2);
        for round in 0..3 {
            for page in 0..32 {
                primary[page * PAGE + round] ^= 1;
            }
            sync(&mut encoder, &primary, &mut shadow);
        }
    }

    #[test]
    fn hostile_batches_are_refused_not_applied_out_of_bounds() {
        let mut shadow = Memory(vec![0; 2 * PAGE]);
        assert!(matches!(apply(&[], &mut shadow), Err(DecodeError::Truncated)));
        assert!(matches!(apply(&[9], &mut shadow), Err(DecodeError::Kind(9))));
        assert!(matches!(apply(&[LZ4, 1, 2, 3], &mut shadow), Err(DecodeError::Lz4(_))));
        let mut beyond = vec![RAW, ZERO];
        put_varint(&mut beyond, 2 * PAGE as u64);
        assert!(matches!(apply(&beyond, &mut shadow), Err(DecodeError::Offset(_))));
        let mut misaligned = vec![RAW, ZERO];
        put_varint(&mut misaligned, 7);
        assert!(matches!(apply(&misaligned, &mut shadow), Err(DecodeError::Offset(7))));
        assert!(matches!(apply(&[RAW, FULL, 0, 1, 2], &mut shadow), Err(DecodeError::Truncated)));
        // A delta whose runs run past the page.
        let mut delta = vec![RAW, DELTA, 0];
        let mut runs = Vec::new();
        put_varint(&mut runs, 4000);
        put_varint(&mut runs, 200);
        runs.extend(std::iter::repeat_n(1, 200));
        put_varint(&mut delta, runs.len() as u64);
        delta.extend(runs);
        assert!(matches!(apply(&delta, &mut shadow), Err(DecodeError::Delta(0))));
        assert!(shadow.0.iter().all(|&b| b == 0), "nothing applied from refused batches");
    }
}
