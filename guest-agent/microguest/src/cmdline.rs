//! `key=value` arguments from the kernel command line. Words without `=` and keys no program
//! asks for are ignored, so the same line can carry Linux or VMM parameters too.
use core::fmt;

const MAX_ARGS: usize = 48;

pub struct Args<'a> {
    pairs: [(&'a str, &'a str); MAX_ARGS],
    count: usize,
}

/// A malformed or out-of-range argument value.
pub struct BadArg<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub expected: &'static str,
}

impl fmt::Display for BadArg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "invalid {}={:?}: expected {}", self.key, self.value, self.expected)
    }
}

impl<'a> Args<'a> {
    pub fn parse(line: &'a str) -> Self {
        let mut args = Args { pairs: [("", ""); MAX_ARGS], count: 0 };
        for word in line.split_ascii_whitespace() {
            if let Some((key, value)) = word.split_once('=')
                && args.count < MAX_ARGS
            {
                args.pairs[args.count] = (key, value);
                args.count += 1;
            }
        }
        args
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs[..self.count].iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// All values given for `key`, in order.
    #[allow(dead_code)]
    pub fn all(&self, key: &'a str) -> impl Iterator<Item = &'a str> + '_ {
        self.pairs[..self.count].iter().filter(move |(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// `key` as a decimal (or 0x-prefixed hex) integer within `min..=max`, or `default`.
    pub fn u64_in(&self, key: &'a str, default: u64, min: u64, max: u64) -> Result<u64, BadArg<'a>> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        };
        match parsed {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(BadArg { key, value, expected: "an integer in range" }),
        }
    }
}
