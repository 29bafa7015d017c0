//! virtio-blk: the device model and its swappable backends.

pub mod backend;
mod device;
pub mod request;
pub mod undo;

pub use backend::{
    BackendError, BlockBackend, BlockInfo, BlockOp, Fault, FaultyBackend, FileBackend, Half, ImageId, IoBuf,
    MirrorBackend, MirrorControl, MirrorProgress, NbdBackend, NbdTarget, NbdTimeouts, ProbeError, UringBackend, probe,
};
pub use device::{BLOCK_QUEUE_SIZE, Takeover, VirtioBlock};
pub use undo::{UndoLog, Undone};
