//! A writer for the "newc" cpio format, the only archive format the kernel unpacks into its
//! initramfs.
//!
//! Each entry is a 110-byte ASCII header (the magic `070701` and 13 fields of 8 hex digits),
//! the name with its NUL, padding to a 4-byte boundary, the data, and padding again; a
//! `TRAILER!!!` entry ends the archive. Names are written without a leading `/` (the kernel
//! unpacks relative to its root either way, and that is what `gen_init_cpio` writes). Every
//! entry gets its own inode number so the kernel never takes two entries for hard links of
//! one file, and mtime, uid and gid are 0 so the same inputs give the same bytes.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
/// Size of the header: the magic and 13 fields of 8 hex digits.
pub const HEADER_LEN: usize = 6 + 13 * 8;
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc cpio archive entry by entry. Call [`CpioWriter::finish`] to write the
/// trailer; dropping the writer without it leaves an archive the kernel rejects.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far, for the 4-byte padding.
    offset: u64,
    next_ino: u32,
}

/// The fields of one header that differ between entry kinds.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

impl<W: Write> CpioWriter<W> {
    /// A writer that starts an empty archive on `out`.
    pub fn new(out: W) -> Self {
        Self { out, offset: 0, next_ino: 1 }
    }

    /// A directory; `mode` holds the permission bits (e.g. `0o755`).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.entry(Entry { name: path, mode: S_IFDIR | (mode & 0o7777), nlink: 2, rdev: (0, 0), data: &[] })
    }

    /// A regular file with the given contents.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(Entry { name: path, mode: S_IFREG | (mode & 0o7777), nlink: 1, rdev: (0, 0), data })
    }

    /// A symbolic link; the target is stored as the entry's data, without a NUL.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(Entry { name: path, mode: S_IFLNK | 0o777, nlink: 1, rdev: (0, 0), data: target.as_bytes() })
    }

    /// A character device node, such as `/dev/console` (5, 1).
    pub fn add_char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(Entry { name: path, mode: S_IFCHR | (mode & 0o7777), nlink: 1, rdev: (major, minor), data: &[] })
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_header(0, 0, 1, (0, 0), 0, TRAILER)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, entry: Entry) -> io::Result<()> {
        let name = entry.name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name == TRAILER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {:?}", entry.name),
            ));
        }
        let size = u32::try_from(entry.data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is too large for a cpio entry (4 GiB at most)"))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.write_header(ino, entry.mode, entry.nlink, entry.rdev, size, name)?;
        self.write(entry.data)?;
        self.pad()
    }

    fn write_header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: u32,
        name: &str,
    ) -> io::Result<()> {
        let name_size = name.len() as u32 + 1;
        // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check (unused by newc).
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write(&header)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.offset % 4) % 4;
        self.write(&[0u8; 3][..padding as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 13 header fields of the entry starting at `at`, and the entry's name.
    fn header(archive: &[u8], at: usize) -> ([u32; 13], String) {
        assert_eq!(&archive[at..at + 6], MAGIC, "magic at {at}");
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&archive[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
            *field = u32::from_str_radix(hex, 16).unwrap();
        }
        let name_len = fields[11] as usize;
        let name = &archive[at + HEADER_LEN..at + HEADER_LEN + name_len];
        assert_eq!(name.last(), Some(&0), "name is NUL-terminated");
        (fields, String::from_utf8(name[..name_len - 1].to_vec()).unwrap())
    }

    fn round_up4(n: usize) -> usize {
        n.div_ceil(4) * 4
    }

    #[test]
    fn file_entry_is_laid_out_byte_by_byte() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_file("/init", 0o755, b"hello").unwrap();
        let archive = w.finish().unwrap();

        let mut expected = Vec::new();
        expected.extend_from_slice(b"070701");
        expected.extend_from_slice(b"00000001"); // ino
        expected.extend_from_slice(b"000081ED"); // mode: S_IFREG | 0755
        expected.extend_from_slice(b"00000000"); // uid
        expected.extend_from_slice(b"00000000"); // gid
        expected.extend_from_slice(b"00000001"); // nlink
        expected.extend_from_slice(b"00000000"); // mtime
        expected.extend_from_slice(b"00000005"); // filesize
        expected.extend_from_slice(b"00000000"); // devmajor
        expected.extend_from_slice(b"00000000"); // devminor
        expected.extend_from_slice(b"00000000"); // rdevmajor
        expected.extend_from_slice(b"00000000"); // rdevminor
        expected.extend_from_slice(b"00000005"); // namesize: "init" + NUL
        expected.extend_from_slice(b"00000000"); // check
        expected.extend_from_slice(b"init\0"); // 110 + 5 = 115: one byte of padding
        expected.push(0);
        expected.extend_from_slice(b"hello\0\0\0"); // 116 + 5 = 121: three bytes
        expected.extend_from_slice(b"070701");
        expected.extend_from_slice(b"00000000"); // trailer: ino 0
        expected.extend_from_slice(b"00000000"); // mode 0
        expected.extend_from_slice(b"0000000000000000");
        expected.extend_from_slice(b"00000001"); // nlink 1
        expected.extend_from_slice(&b"00000000".repeat(6));
        expected.extend_from_slice(b"0000000B"); // "TRAILER!!!" + NUL
        expected.extend_from_slice(b"00000000");
        expected.extend_from_slice(b"TRAILER!!!\0\0\0\0"); // 124 + 110 + 11 = 245: 3 bytes
        assert_eq!(archive.len(), 248);
        assert_eq!(String::from_utf8_lossy(&archive), String::from_utf8_lossy(&expected));
        assert_eq!(archive, expected);
    }

    #[test]
    fn every_kind_of_entry_has_its_mode_and_fields() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("dev", 0o755).unwrap();
        w.add_char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.add_symlink("/bin/sh", "busybox").unwrap();
        w.add_file("bin/busybox", 0o755, &[0xAA; 9]).unwrap();
        let archive = w.finish().unwrap();

        let mut at = 0;
        let mut entries = Vec::new();
        loop {
            let (fields, name) = header(&archive, at);
            let data_at = round_up4(at + HEADER_LEN + fields[11] as usize);
            let size = fields[6] as usize;
            entries.push((fields, name.clone(), archive[data_at..data_at + size].to_vec()));
            at = round_up4(data_at + size);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(at, archive.len(), "the trailer ends the archive");
        assert_eq!(archive.len() % 4, 0);

        let names: Vec<_> = entries.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "bin/sh", "bin/busybox", "TRAILER!!!"]);
        let inodes: Vec<_> = entries.iter().map(|e| e.0[0]).collect();
        assert_eq!(inodes, [1, 2, 3, 4, 0], "inodes are unique, the trailer's is 0");

        let (dir, _, _) = &entries[0];
        assert_eq!(dir[1], 0o040_755);
        assert_eq!(dir[4], 2, "a directory has two links");

        let (console, _, data) = &entries[1];
        assert_eq!(console[1], 0o020_600);
        assert_eq!((console[9], console[10]), (5, 1), "rdevmajor, rdevminor");
        assert_eq!((console[7], console[8]), (0, 0), "devmajor, devminor");
        assert!(data.is_empty());

        let (link, _, target) = &entries[2];
        assert_eq!(link[1], 0o120_777);
        assert_eq!(link[6], 7);
        assert_eq!(target, b"busybox", "the target is the data, without a NUL");

        let (file, _, data) = &entries[3];
        assert_eq!(file[1], 0o100_755);
        assert_eq!(data, &[0xAA; 9]);
    }

    #[test]
    fn padding_keeps_every_header_aligned_for_all_name_and_data_lengths() {
        for name_len in 1..=8 {
            for data_len in 0..=8 {
                let name = "n".repeat(name_len);
                let mut w = CpioWriter::new(Vec::new());
                w.add_file(&name, 0o644, &vec![1; data_len]).unwrap();
                let archive = w.finish().unwrap();
                let data_at = round_up4(HEADER_LEN + name_len + 1);
                let trailer_at = round_up4(data_at + data_len);
                let (fields, trailer) = header(&archive, trailer_at);
                assert_eq!(trailer, "TRAILER!!!", "name {name_len}, data {data_len}");
                assert_eq!(fields[0], 0);
                assert!(archive[HEADER_LEN + name_len..data_at].iter().all(|&b| b == 0));
                assert!(archive[data_at..data_at + data_len].iter().all(|&b| b == 1));
                assert!(archive[data_at + data_len..trailer_at].iter().all(|&b| b == 0));
                assert_eq!(archive.len() % 4, 0);
            }
        }
    }

    #[test]
    fn invalid_names_are_rejected() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.add_dir("/", 0o755).is_err());
        assert!(w.add_file("a\0b", 0o644, b"").is_err());
        assert!(w.add_file("TRAILER!!!", 0o644, b"").is_err());
    }
}
