//! The NBD wire format and the handshake, run synchronously on a blocking socket.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::NbdTarget;

/// Bounds every handshake step, so a silent server cannot hang VM creation.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The protocol's default payload limit when the server states none.
const DEFAULT_MAX_BLOCK: u32 = 32 << 20;
/// Option replies are small (info records, error messages): anything bigger is garbage.
const MAX_OPTION_REPLY: usize = 64 << 10;
/// The protocol caps strings, export names included, at 4096 bytes.
pub(super) const MAX_NAME: usize = 4096;
pub(super) const SECTOR: u64 = 512;

// Protocol constants, as named by the NBD specification.
pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The obsolete oldstyle negotiation's second magic.
pub(super) const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(super) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(super) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(super) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(super) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(super) const OPT_EXPORT_NAME: u32 = 1;
pub(super) const OPT_ABORT: u32 = 2;
pub(super) const OPT_GO: u32 = 7;
pub(super) const REP_ACK: u32 = 1;
pub(super) const REP_INFO: u32 = 3;
pub(super) const REP_ERR: u32 = 1 << 31;
pub(super) const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub(super) const INFO_EXPORT: u16 = 0;
pub(super) const INFO_BLOCK_SIZE: u16 = 3;

pub(super) const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(super) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(super) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(super) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(super) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_WRITE: u16 = 1;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const CMD_FLUSH: u16 = 3;
pub(super) const CMD_TRIM: u16 = 4;
pub(super) const CMD_WRITE_ZEROES: u16 = 6;

pub(super) const REQUEST_LEN: usize = 28;
pub(super) const REPLY_LEN: usize = 16;

/// The connection to the server, whichever kind.
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(super) fn connect(target: &NbdTarget) -> io::Result<Stream> {
        match target {
            NbdTarget::Unix { path } => UnixStream::connect(path).map(Stream::Unix),
            NbdTarget::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
                        Ok(s) => {
                            // Requests are small and latency-bound: Nagle would hold them back.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    pub(super) fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    pub(super) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(true),
            Stream::Unix(s) => s.set_nonblocking(true),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A big-endian integer from up to 8 bytes.
pub(super) fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

fn handshake_error(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection during the handshake".into(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("the server did not answer within {} s", HANDSHAKE_TIMEOUT.as_secs())
        }
        _ => format!("handshake failed: {e}"),
    }
}

/// What the handshake settled.
pub(super) struct Export {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) max_block: u32,
}

fn describe_export(name: &str) -> String {
    if name.is_empty() { "the default export".into() } else { format!("export {name:?}") }
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> Result<(), String> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).map_err(handshake_error)
}

/// Reads one option reply: its type and payload.
fn read_option_reply(s: &mut Stream, option: u32) -> Result<(u32, Vec<u8>), String> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).map_err(handshake_error)?;
    if be(&h[0..8]) != OPT_REPLY_MAGIC {
        return Err(format!("bad option reply magic {:#x}", be(&h[0..8])));
    }
    if be(&h[8..12]) != u64::from(option) {
        return Err(format!("reply to option {} while negotiating option {option}", be(&h[8..12])));
    }
    let len = be(&h[16..20]) as usize;
    if len > MAX_OPTION_REPLY {
        return Err(format!("option reply of {len} bytes"));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).map_err(handshake_error)?;
    Ok((be(&h[12..16]) as u32, payload))
}

fn option_error(reply: u32, payload: &[u8], name: &str) -> String {
    let what = match reply & !REP_ERR {
        1 => "unsupported option",
        2 => "forbidden by server policy",
        3 => "invalid request",
        4 => "unsupported on the server's platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "the server is shutting down",
        8 => "block size negotiation required",
        9 => "request too big",
        _ => "error",
    };
    let message = String::from_utf8_lossy(payload);
    let message = message.trim();
    let export = describe_export(name);
    if message.is_empty() {
        format!("server refused {export}: {what}")
    } else {
        format!("server refused {export}: {what} ({message})")
    }
}

/// NBD_OPT_GO, asking for block size constraints too; `None` if the server does not know the
/// option (then NBD_OPT_EXPORT_NAME is the way in).
fn opt_go(s: &mut Stream, name: &str) -> Result<Option<Export>, String> {
    let mut data = Vec::with_capacity(8 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut described = None;
    let mut max_block = DEFAULT_MAX_BLOCK;
    loop {
        let (reply, p) = read_option_reply(s, OPT_GO)?;
        match reply {
            REP_ACK => {
                let (size, flags) = described.ok_or("the server accepted the export without describing it")?;
                return Ok(Some(Export { size, flags, max_block }));
            }
            REP_INFO if p.len() >= 12 && be(&p[0..2]) == u64::from(INFO_EXPORT) => {
                described = Some((be(&p[2..10]), be(&p[10..12]) as u16));
            }
            REP_INFO if p.len() >= 14 && be(&p[0..2]) == u64::from(INFO_BLOCK_SIZE) => {
                // Asking for this promised to honour the minimum; virtio-blk needs 512.
                let min = be(&p[2..6]);
                if min > SECTOR {
                    return Err(format!("the export needs {min}-byte aligned requests, more than 512"));
                }
                max_block = be(&p[10..14]) as u32;
            }
            REP_ERR_UNSUP => return Ok(None),
            r if r & REP_ERR != 0 => return Err(option_error(r, &p, name)),
            // Other records are informational, and unknown reply types are safe to skip.
            _ => {}
        }
    }
}

/// NBD_OPT_EXPORT_NAME: the old way in, which cannot report errors (the server just hangs up).
fn opt_export_name(s: &mut Stream, name: &str, no_zeroes: bool) -> Result<Export, String> {
    send_option(s, OPT_EXPORT_NAME, name.as_bytes())?;
    let mut reply = [0u8; 10 + 124];
    let len = if no_zeroes { 10 } else { reply.len() };
    s.read_exact(&mut reply[..len]).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("the server hung up: no {}?", describe_export(name)),
        _ => handshake_error(e),
    })?;
    Ok(Export { size: be(&reply[0..8]), flags: be(&reply[8..10]) as u16, max_block: DEFAULT_MAX_BLOCK })
}

/// The fixed-newstyle handshake (plain newstyle for servers that lack it).
pub(super) fn handshake(s: &mut Stream, name: &str) -> Result<Export, String> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).map_err(handshake_error)?;
    if be(&greeting[0..8]) != NBDMAGIC {
        return Err("not an NBD server".into());
    }
    match be(&greeting[8..16]) {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err("the server only speaks the obsolete oldstyle negotiation".into()),
        magic => return Err(format!("unexpected handshake magic {magic:#x}")),
    }
    let server_flags = be(&greeting[16..18]) as u16;
    let fixed = server_flags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    // Only flags the server offered may be echoed, or it must drop the connection.
    let mut client_flags = 0u32;
    if fixed {
        client_flags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).map_err(handshake_error)?;
    if fixed {
        match opt_go(s, name) {
            Ok(Some(export)) => return Ok(export),
            Ok(None) => {}
            Err(e) => {
                // Politely end the negotiation (a soft disconnect); the error is what matters.
                let _ = send_option(s, OPT_ABORT, &[]);
                return Err(e);
            }
        }
    }
    opt_export_name(s, name, no_zeroes)
}

pub(super) fn request_header(cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // h[4..6]: command flags, none used.
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}
