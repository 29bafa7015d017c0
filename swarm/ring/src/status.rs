//! The status record each VM of a swarm publishes on its control lane: what it serves, how
//! loaded it is, what hardware it has. The manager routes by it.
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 2 | the VM (the manager's numbering) |
//! | 2 | 2 | zero |
//! | 4 | 4 | layers served, a bit per layer |
//! | 8 | 4 | requests queued (its input lanes' depth) |
//! | 12 | 4 | requests it can still take |
//! | 16 | 8 | requests served so far |
//! | 24 | 4 | hardware affinity, a bit per label (the manager names them) |
//! | 28 | 4 | zero |

/// Bytes of a record.
pub const STATUS_BYTES: usize = 32;

/// One VM's status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStatus {
    /// The VM.
    pub vm: u16,
    /// Layers it serves, a bit per layer.
    pub layers: u32,
    /// Requests queued.
    pub load: u32,
    /// Requests it can still take.
    pub capacity: u32,
    /// Requests served so far.
    pub served: u64,
    /// Hardware it has, a bit per label.
    pub affinity: u32,
}

impl VmStatus {
    /// The record's bytes.
    pub fn encode(&self) -> [u8; STATUS_BYTES] {
        let mut out = [0u8; STATUS_BYTES];
        out[0..2].copy_from_slice(&self.vm.to_le_bytes());
        out[4..8].copy_from_slice(&self.layers.to_le_bytes());
        out[8..12].copy_from_slice(&self.load.to_le_bytes());
        out[12..16].copy_from_slice(&self.capacity.to_le_bytes());
        out[16..24].copy_from_slice(&self.served.to_le_bytes());
        out[24..28].copy_from_slice(&self.affinity.to_le_bytes());
        out
    }

    /// Reads a record; `None` unless it is exactly one with its reserved bytes zero.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; STATUS_BYTES] = bytes.try_into().ok()?;
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if b[2..4] != [0, 0] || u32_at(28) != 0 {
            return None;
        }
        let mut served = [0u8; 8];
        served.copy_from_slice(&b[16..24]);
        Some(Self {
            vm: u16::from_le_bytes([b[0], b[1]]),
            layers: u32_at(4),
            load: u32_at(8),
            capacity: u32_at(12),
            served: u64::from_le_bytes(served),
            affinity: u32_at(24),
        })
    }
}
