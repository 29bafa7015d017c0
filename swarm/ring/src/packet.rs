//! The header of a request moving through a pipeline of VMs, one protocol layer per VM: it
//! travels at the start of every ring message.
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 8 | request id (the front end's, unique while in flight) |
//! | 8 | 2 | the VM it goes to next (the manager's numbering) |
//! | 10 | 2 | the protocol layer that handles it next |
//! | 12 | 1 | [`PacketStatus`] |
//! | 13 | 3 | zero |
//! | 16 | 4 | payload length |
//! | 20 | 4 | zero |
//! | 24 | ... | payload |

/// Bytes before the payload.
pub const HEADER_BYTES: usize = 24;

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketStatus {
    /// Waiting for its next layer.
    Pending = 0,
    /// A layer works on it.
    InProgress = 1,
    /// Every layer is done: the payload is the answer.
    Completed = 2,
    /// A layer refused it: the payload says why.
    Error = 3,
}

impl PacketStatus {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Pending,
            1 => Self::InProgress,
            2 => Self::Completed,
            3 => Self::Error,
            _ => return None,
        })
    }
}

/// A request's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// The front end's id for the request.
    pub request_id: u64,
    /// The VM it goes to next.
    pub next_vm: u16,
    /// The layer that handles it next.
    pub layer: u16,
    /// Where it stands.
    pub status: PacketStatus,
    /// Bytes of payload after the header.
    pub payload_len: u32,
}

/// Why bytes are not a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketError {
    /// Fewer bytes than a header, or than the header says follow.
    Short,
    /// A status byte no sender writes.
    BadStatus(u8),
    /// Reserved bytes that are not zero.
    Reserved,
}

impl PacketHeader {
    /// Writes the header and `payload` into `out`; returns the bytes written, or `None` if
    /// `out` is too small.
    pub fn encode(&self, payload: &[u8], out: &mut [u8]) -> Option<usize> {
        let total = HEADER_BYTES.checked_add(payload.len())?;
        let out = out.get_mut(..total)?;
        out[..HEADER_BYTES].fill(0);
        out[0..8].copy_from_slice(&self.request_id.to_le_bytes());
        out[8..10].copy_from_slice(&self.next_vm.to_le_bytes());
        out[10..12].copy_from_slice(&self.layer.to_le_bytes());
        out[12] = self.status as u8;
        out[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        out[HEADER_BYTES..].copy_from_slice(payload);
        Some(total)
    }

    /// Reads a packet: its header and its payload.
    pub fn decode(bytes: &[u8]) -> Result<(Self, &[u8]), PacketError> {
        let header = bytes.get(..HEADER_BYTES).ok_or(PacketError::Short)?;
        let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&header[0..8]);
        let status = PacketStatus::from_byte(header[12]).ok_or(PacketError::BadStatus(header[12]))?;
        if header[13..16] != [0, 0, 0] || u32_at(20) != 0 {
            return Err(PacketError::Reserved);
        }
        let payload_len = u32_at(16);
        let payload = bytes[HEADER_BYTES..].get(..payload_len as usize).ok_or(PacketError::Short)?;
        let packet =
            Self { request_id: u64::from_le_bytes(id), next_vm: u16_at(8), layer: u16_at(10), status, payload_len };
        Ok((packet, payload))
    }
}
