//! The virtio-vsock packet header (virtio 1.x 5.10.6), little endian, 44 bytes.

/// Size of the packet header in bytes; the payload follows it.
pub const HEADER_LEN: usize = 44;
/// The only socket type supported: streams.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (the header's `op` field).
pub mod op {
    /// Opens a connection.
    pub const REQUEST: u16 = 1;
    /// Accepts a connection request.
    pub const RESPONSE: u16 = 2;
    /// Resets (refuses or aborts) a connection.
    pub const RST: u16 = 3;
    /// The sender will receive and/or send no more, as the header's shutdown flags say.
    pub const SHUTDOWN: u16 = 4;
    /// Stream data; the payload follows the header.
    pub const RW: u16 = 5;
    /// Tells the peer the sender's current `buf_alloc` and `fwd_cnt`.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
}

/// A decoded packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type; only `TYPE_STREAM` is supported.
    pub type_: u16,
    /// The operation, one of [`op`].
    pub op: u16,
    /// Operation-specific flags (the shutdown flags for `op::SHUTDOWN`).
    pub flags: u32,
    /// Sender's receive buffer for this connection, in bytes.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header from its little-endian wire form.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in its little-endian wire form.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 80,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 0x4_0000,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1234u32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &99u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
