//! Logging for events the guest controls: a hostile guest must not be able to flood the log.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Mutex;

/// Remembers which keys were already reported, up to a bound, so each is logged once.
pub struct LogOnce<K> {
    seen: Mutex<HashSet<K>>,
    capacity: usize,
}

impl<K: Eq + Hash> LogOnce<K> {
    /// Remembers at most `capacity` keys; once that many were seen, nothing more is reported.
    pub fn new(capacity: usize) -> Self {
        Self { seen: Mutex::new(HashSet::new()), capacity }
    }

    /// True the first time `key` is seen (and while fewer than `capacity` keys were seen).
    pub fn first(&self, key: K) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= self.capacity {
            return false;
        }
        seen.insert(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_each_key_once_up_to_capacity() {
        let once = LogOnce::new(2);
        assert!(once.first(1));
        assert!(!once.first(1));
        assert!(once.first(2));
        assert!(!once.first(3));
    }
}
