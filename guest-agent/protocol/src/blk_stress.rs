//! The on-disk format of the microguest's `blk-stress` program, and the digest it prints, so
//! a host test can check a disk image against the guest's summary line.
//!
//! The disk is used as an array of 4096-byte blocks; block `b` lies at byte offset
//! `b * 4096`. Every block `blk-stress` writes is self-describing: 512 little-endian u64 words,
//!
//! | byte offset | word | content |
//! |---|---|---|
//! | 0 | 0 | [`MAGIC`], the bytes `"MGBLKST1"` |
//! | 8 | 1 | block number `b` |
//! | 16 | 2 | sequence number: 1 for the block's first write in this run, +1 for every later one |
//! | 24 | 3 | the run's seed |
//! | 32..4088 | 4..=510 | payload: word `i` is [`payload_word`]`(seed, b, seq, i)` |
//! | 4088 | 511 | checksum: [`checksum`] over words 0..=510 |
//!
//! A block holds this run's data when magic, block number, seed and checksum all match (and,
//! for a full check, the payload); its sequence is then word 2. A block that does not is
//! "never written", sequence 0.
//!
//! The digest is 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3) over,
//! for every block `b` in `0..blocks` in order, the 16 bytes `b.to_le_bytes()` followed by
//! `seq.to_le_bytes()` (see [`Digest`]); the guest prints it as 16 lower-case hex digits.

/// Bytes in one block.
pub const BLOCK_SIZE: usize = 4096;
/// u64 words in one block.
pub const BLOCK_WORDS: usize = BLOCK_SIZE / 8;
/// Word 0 of every block written: `"MGBLKST1"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MGBLKST1");
/// Word indices of the header fields and the checksum.
pub const WORD_MAGIC: usize = 0;
pub const WORD_BLOCK: usize = 1;
pub const WORD_SEQUENCE: usize = 2;
pub const WORD_SEED: usize = 3;
pub const WORD_PAYLOAD: usize = 4;
pub const WORD_CHECKSUM: usize = BLOCK_WORDS - 1;

/// splitmix64's finalizer.
pub const fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The key every payload word of one block version derives from.
pub const fn payload_key(seed: u64, block: u64, seq: u64) -> u64 {
    mix(seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
}

/// Payload word `index` (4..=510) of `block` at sequence `seq`: `mix(key + index)`, with the
/// key from [`payload_key`].
pub const fn payload_word(seed: u64, block: u64, seq: u64, index: usize) -> u64 {
    mix(payload_key(seed, block, seq).wrapping_add(index as u64))
}

/// The checksum of words 0..=510: `h = 0xcbf29ce484222325`, then for each word
/// `h = ((h ^ w) * 0x100000001b3).rotate_left(29)` (wrapping multiply).
pub fn checksum(words: &[u64]) -> u64 {
    words[..WORD_CHECKSUM]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &w| (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29))
}

/// Fills `words` (one block) with the content of `block` at sequence `seq`.
pub fn fill(words: &mut [u64], block: u64, seq: u64, seed: u64) {
    words[WORD_MAGIC] = MAGIC;
    words[WORD_BLOCK] = block;
    words[WORD_SEQUENCE] = seq;
    words[WORD_SEED] = seed;
    let key = payload_key(seed, block, seq);
    for (i, w) in words[WORD_PAYLOAD..WORD_CHECKSUM].iter_mut().enumerate() {
        *w = mix(key.wrapping_add((WORD_PAYLOAD + i) as u64));
    }
    words[WORD_CHECKSUM] = checksum(words);
}

/// Header of a block that passed the magic and checksum checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub block: u64,
    pub seq: u64,
    pub seed: u64,
}

/// Why a block is not a valid `blk-stress` block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    Magic,
    Checksum,
    /// Header and checksum fine, payload not what the header says (only from [`parse_words`]
    /// with `full` set).
    Payload,
}

/// Reads one block's words: its header if magic and checksum (and with `full`, the payload)
/// are right.
pub fn parse_words(words: &[u64], full: bool) -> Result<Header, Invalid> {
    if words[WORD_MAGIC] != MAGIC {
        return Err(Invalid::Magic);
    }
    if checksum(words) != words[WORD_CHECKSUM] {
        return Err(Invalid::Checksum);
    }
    let header = Header { block: words[WORD_BLOCK], seq: words[WORD_SEQUENCE], seed: words[WORD_SEED] };
    if full {
        let key = payload_key(header.seed, header.block, header.seq);
        let payload = &words[WORD_PAYLOAD..WORD_CHECKSUM];
        if payload.iter().enumerate().any(|(i, &w)| w != mix(key.wrapping_add((WORD_PAYLOAD + i) as u64))) {
            return Err(Invalid::Payload);
        }
    }
    Ok(header)
}

/// The sequence number block `block` of a disk image holds for run `seed`: `bytes` is the
/// block's 4096 bytes; 0 when the block does not carry this run's data for this block.
pub fn image_block_seq(bytes: &[u8], block: u64, seed: u64) -> u64 {
    let mut words = [0u64; BLOCK_WORDS];
    for (w, chunk) in words.iter_mut().zip(bytes[..BLOCK_SIZE].chunks_exact(8)) {
        *w = u64::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]);
    }
    match parse_words(&words, true) {
        Ok(h) if h.block == block && h.seed == seed => h.seq,
        _ => 0,
    }
}

/// The run digest: 64-bit FNV-1a over (block, sequence) pairs, each as two little-endian u64s,
/// for blocks 0, 1, 2, ... in order.
#[derive(Clone, Copy)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    pub const fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }

    /// Adds the next block (blocks must come in order, starting at 0).
    pub fn add(&mut self, block: u64, seq: u64) {
        for b in block.to_le_bytes().into_iter().chain(seq.to_le_bytes()) {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_parse() {
        let mut words = [0u64; BLOCK_WORDS];
        fill(&mut words, 7, 3, 0x1234);
        assert_eq!(parse_words(&words, true), Ok(Header { block: 7, seq: 3, seed: 0x1234 }));
        let bytes: [u8; BLOCK_SIZE] = core::array::from_fn(|i| words[i / 8].to_le_bytes()[i % 8]);
        assert_eq!(image_block_seq(&bytes, 7, 0x1234), 3);
        assert_eq!(image_block_seq(&bytes, 8, 0x1234), 0);
        assert_eq!(image_block_seq(&bytes, 7, 0x1235), 0);
        words[100] ^= 1 << 63;
        assert_eq!(parse_words(&words, false), Err(Invalid::Checksum));
        assert_eq!(image_block_seq(&[0u8; BLOCK_SIZE], 0, 0), 0);
    }

    /// Values from an independent (Python) implementation of the format, so it cannot drift.
    #[test]
    fn known_values() {
        let mut words = [0u64; BLOCK_WORDS];
        fill(&mut words, 7, 3, 0x1234);
        assert_eq!(words[WORD_PAYLOAD], 0xf326_833b_f26f_95ce);
        assert_eq!(words[WORD_CHECKSUM], 0x37b1_072c_5b51_9391);
        let mut d = Digest::new();
        d.add(0, 1);
        d.add(1, 2);
        assert_eq!(d.value(), 0x72ce_0b16_b914_b7c7);
    }

    #[test]
    fn digest_is_fnv1a_over_pairs() {
        // FNV-1a of no bytes is the offset basis; of 16 zero bytes a fixed value.
        assert_eq!(Digest::new().value(), 0xcbf2_9ce4_8422_2325);
        let mut d = Digest::new();
        d.add(0, 0);
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for _ in 0..16 {
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(d.value(), h);
    }
}
