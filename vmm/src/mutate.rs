//! Deterministic input mutation for the parsers' robustness tests: the seed corpus of valid
//! inputs, mutated the way fuzzers do (bit flips, byte overwrites, truncation, duplication,
//! splices of interesting values), with a fixed seed so a failure reproduces. Run as part of
//! `cargo test`; the cargo-fuzz targets explore further from the same kind of corpus.

/// A xorshift generator and the mutations.
pub struct Mutator(u64);

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A mutant of `input`: one to four mutations stacked.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        const INTERESTING: &[&[u8]] = &[
            b"\r\n",
            b"\r\n\r\n",
            b":",
            b" ",
            b"\0",
            b"\xff",
            b"-1",
            b"4294967296",
            b"18446744073709551616",
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b"\\",
            b"null",
            b"99999999999999999999999",
            b"%",
            b"?",
            b"&",
            b"=",
        ];
        let mut out = input.to_vec();
        for _ in 0..1 + self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(6) {
                0 if !out.is_empty() => {
                    let i = at.min(out.len() - 1);
                    out[i] ^= 1 << self.below(8);
                }
                1 if !out.is_empty() => {
                    let i = at.min(out.len() - 1);
                    out[i] = self.next() as u8;
                }
                2 => out.truncate(at),
                3 => {
                    let end = (at + self.below(32)).min(out.len());
                    let piece = out[at..end].to_vec();
                    out.splice(at..at, piece);
                }
                _ => {
                    let value = INTERESTING[self.below(INTERESTING.len())];
                    out.splice(at..at, value.iter().copied());
                }
            }
        }
        out
    }
}
