//! The snapshot's files and their checks.
//!
//! A snapshot is a directory with two files:
//! - `state`: a 32-byte header (magic, format version, payload length, CRC-64 of the payload)
//!   followed by the payload, the [`VmSnapshot`](super::VmSnapshot) in CBOR (serde, through
//!   ciborium: self-describing, so tagged enums in the configuration round-trip).
//! - `memory`: guest RAM, regions at consecutive offsets; pages that are all zeros are holes,
//!   so the file takes only the disk space of the data and reading it skips them.
//!
//! A file that is truncated, corrupted, of another format version or not a snapshot at all is
//! refused with the reason before anything is built from it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Name of the state file in a snapshot directory: header and CBOR payload.
pub const STATE_FILE: &str = "state";
/// Name of the memory file in a snapshot directory: guest RAM, zero pages as holes.
pub const MEMORY_FILE: &str = "memory";
/// The state file while it is written (renamed into place when complete).
pub const STATE_TMP_FILE: &str = "state.tmp";

const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// Bumped whenever the payload's meaning changes; older files are refused, not guessed at.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
/// A state file is a few hundred KiB at most (vCPU state is ~6 KiB each); anything far bigger
/// is not ours, and must not make us allocate it.
const MAX_PAYLOAD: u64 = 256 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Why a state file could not be written, or why a file is refused as a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Opening, reading, writing or renaming a snapshot file failed.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the snapshot magic: it is not a state file.
    #[error("{path} is not a snapshot state file (bad magic)")]
    Magic {
        /// The file read.
        path: PathBuf,
    },
    /// The state file has another [`FORMAT_VERSION`] than this vmm's.
    #[error("{path} has snapshot format version {found}; this vmm reads version {FORMAT_VERSION}")]
    Version {
        /// The file read.
        path: PathBuf,
        /// The version in its header.
        found: u32,
    },
    /// The file is shorter than its header, or than the data its header or state describes.
    #[error("{path} is truncated: {what}")]
    Truncated {
        /// The file read.
        path: PathBuf,
        /// How short it is.
        what: String,
    },
    /// The payload's CRC-64 does not match the header's, or data follows the payload.
    #[error("{path} is corrupted: checksum {found:#018x}, expected {expected:#018x}")]
    Checksum {
        /// The file read.
        path: PathBuf,
        /// The checksum in the header.
        expected: u64,
        /// The checksum of the payload read.
        found: u64,
    },
    /// The payload is not a valid state (CBOR that does not decode, or a memory layout that does
    /// not hold together).
    #[error("{path}: cannot decode the state: {reason}")]
    Decode {
        /// The file read.
        path: PathBuf,
        /// What is wrong with the payload.
        reason: String,
    },
    /// The state could not be serialised to CBOR.
    #[error("cannot encode the state: {0}")]
    Encode(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FormatError + '_ {
    move |source| FormatError::Io { path: path.to_path_buf(), source }
}

/// Writes `value` as a state file at `path` (through a temporary file and a rename, so a crash
/// never leaves a half-written state file under the final name).
pub fn write_state<T: Serialize>(path: &Path, value: &T) -> Result<u64, FormatError> {
    let mut payload = Vec::new();
    ciborium::into_writer(value, &mut payload).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&CRC.checksum(&payload).to_le_bytes());
    let tmp = path.with_file_name(STATE_TMP_FILE);
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&header).and_then(|()| file.write_all(&payload)).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok((HEADER_LEN + payload.len()) as u64)
}

/// Reads and checks the state file at `path`.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let truncated = |what: String| FormatError::Truncated { path: path.to_path_buf(), what };
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match file.read(&mut header[got..]).map_err(io_err(path))? {
            0 => break,
            n => got += n,
        }
    }
    if got < MAGIC.len() || header[..8] != MAGIC {
        if got < MAGIC.len() && MAGIC.starts_with(&header[..got]) {
            return Err(truncated(format!("{got} bytes, shorter than the header")));
        }
        return Err(FormatError::Magic { path: path.to_path_buf() });
    }
    if got < HEADER_LEN {
        return Err(truncated(format!("{got} bytes, shorter than the {HEADER_LEN}-byte header")));
    }
    let field = |range: std::ops::Range<usize>| header[range].iter().rev().fold(0u64, |v, b| v << 8 | u64::from(*b));
    let version = field(8..12) as u32;
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { path: path.to_path_buf(), found: version });
    }
    let (len, expected) = (field(16..24), field(24..32));
    let actual_len = file.metadata().map_err(io_err(path))?.len().saturating_sub(HEADER_LEN as u64);
    if len > MAX_PAYLOAD || actual_len < len {
        return Err(truncated(format!("the header announces {len} bytes of state, the file holds {actual_len}")));
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact(&mut payload).map_err(io_err(path))?;
    let found = CRC.checksum(&payload);
    if found != expected || actual_len != len {
        return Err(FormatError::Checksum { path: path.to_path_buf(), expected, found });
    }
    ciborium::from_reader(payload.as_slice())
        .map_err(|e| FormatError::Decode { path: path.to_path_buf(), reason: e.to_string() })
}

/// The size of a page as the memory file stores it: holes are made page by page.
pub const PAGE: usize = 4096;

/// Guest memory that may change while it is read (the guest runs during a snapshot's first
/// pass): read only through volatile loads and system calls, never as a Rust slice.
#[derive(Clone, Copy)]
pub struct LiveMemory {
    ptr: *const u8,
    len: usize,
}

impl LiveMemory {
    /// # Safety
    /// `ptr..ptr + len` must stay mapped while the value is used.
    pub unsafe fn new(ptr: *const u8, len: usize) -> Self {
        Self { ptr, len }
    }

    fn page_is_zero(&self, at: usize) -> bool {
        let end = (at + PAGE).min(self.len);
        (at..end).step_by(8).all(|i| {
            // SAFETY: inside the mapping (see `new`); guest RAM is page aligned, so `i` is too.
            unsafe { std::ptr::read_volatile(self.ptr.add(i).cast::<u64>()) == 0 }
        })
    }

    /// Writes `range` to `file` at `offset + range.start`, as is.
    pub fn write_to(&self, file: &File, offset: u64, range: std::ops::Range<usize>) -> std::io::Result<u64> {
        use std::os::fd::AsRawFd;
        let (mut at, end) = (range.start, range.end.min(self.len));
        while at < end {
            // SAFETY: the kernel reads `end - at` bytes of the mapping (see `new`).
            let n = unsafe {
                libc::pwrite(file.as_raw_fd(), self.ptr.add(at).cast(), end - at, (offset + at as u64) as libc::off_t)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            at += n as usize;
        }
        Ok((range.end.min(self.len) - range.start) as u64)
    }

    /// Writes the non-zero pages of `range` to `file` at `offset + page`, leaving holes for the
    /// rest (runs of non-zero pages go out in one write). Returns the bytes written.
    pub fn write_sparse(&self, file: &File, offset: u64, range: std::ops::Range<usize>) -> std::io::Result<u64> {
        let (mut at, end) = (range.start, range.end.min(self.len));
        let mut written = 0;
        while at < end {
            while at < end && self.page_is_zero(at) {
                at += PAGE;
            }
            let start = at;
            while at < end && !self.page_is_zero(at) {
                at += PAGE;
            }
            if at.min(end) > start {
                written += self.write_to(file, offset, start..at.min(end))?;
            }
        }
        Ok(written)
    }

    /// A copy of `range` read with volatile loads, so the guest may run meanwhile (a page it
    /// writes during the copy may tear; its dirty bit brings it again next time).
    pub fn copy_volatile(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let range = range.start.min(self.len)..range.end.min(self.len);
        let mut out = vec![0u8; range.len()];
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: inside the mapping (see `new`); guest RAM and `range` are page aligned.
            let word = unsafe { std::ptr::read_volatile(self.ptr.add(range.start + i * 8).cast::<u64>()) };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    /// A copy of `range` (call with the guest paused, or the copy may tear).
    pub fn copy_out(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let range = range.start.min(self.len)..range.end.min(self.len);
        let mut out = vec![0u8; range.len()];
        // SAFETY: inside the mapping (see `new`), into a buffer of the same length.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(range.start), out.as_mut_ptr(), out.len()) };
        out
    }
}
