//! The newc ("070701") cpio record encoding, as Linux's `init/initramfs.c` reads it.
//!
//! Each record is a 110-byte ASCII header (magic and 13 fields of 8 hex digits), the name with
//! its NUL, padding so that header + name end on a 4-byte boundary, then the data padded to 4.
//! The archive ends with a record named `TRAILER!!!`.

use std::io::{self, Write};

/// The magic of the "new ASCII" format without checksums.
pub const MAGIC: &[u8; 6] = b"070701";
/// Length of a header: the magic and 13 fields of 8 hex digits.
pub const HEADER_LEN: usize = 6 + 13 * 8;
/// The name of the record that ends an archive.
pub const TRAILER_NAME: &str = "TRAILER!!!";

/// File type bits of `st_mode`, as cpio stores them.
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;

/// The fields of one header that vary between our records. Everything else (uid, gid, mtime,
/// the device of the archived file system, the checksum) is written as 0 so that the same
/// inputs always give the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ino: u32,
    /// File type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub file_size: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

/// Padding needed to bring `len` up to a multiple of 4.
pub fn pad4(len: u64) -> u64 {
    (4 - len % 4) % 4
}

/// Writes one record: header, name (NUL-terminated, padded) and data (padded). Returns the
/// number of bytes written.
///
/// The caller guarantees that `name` holds no NUL, that its length plus one fits in `u32`, and
/// that `header.file_size` is `data.len()`.
pub fn write_record<W: Write>(
    w: &mut W,
    header: &Header,
    name: &str,
    data: &[u8],
) -> io::Result<u64> {
    debug_assert_eq!(header.file_size as usize, data.len());
    let name_size = name.len() + 1;
    let fields: [u32; 13] = [
        header.ino,
        header.mode,
        0, // uid
        0, // gid
        header.nlink,
        0, // mtime
        header.file_size,
        0, // devmajor (of the file system the file came from)
        0, // devminor
        header.rdev_major,
        header.rdev_minor,
        u32::try_from(name_size).map_err(|_| io::Error::other("cpio name too long"))?,
        0, // check (unused by newc)
    ];
    let mut head = Vec::with_capacity(HEADER_LEN + name_size + 3);
    head.extend_from_slice(MAGIC);
    for field in fields {
        // Writing into a Vec cannot fail.
        write!(head, "{field:08x}")?;
    }
    head.extend_from_slice(name.as_bytes());
    head.push(0);
    let name_pad = pad4(head.len() as u64) as usize;
    head.resize(head.len() + name_pad, 0);
    w.write_all(&head)?;

    w.write_all(data)?;
    let data_pad = pad4(data.len() as u64) as usize;
    w.write_all(&[0u8; 3][..data_pad])?;
    Ok((head.len() + data.len() + data_pad) as u64)
}

/// Writes the `TRAILER!!!` record that ends an archive.
pub fn write_trailer<W: Write>(w: &mut W) -> io::Result<u64> {
    let header = Header {
        ino: 0,
        mode: 0,
        nlink: 1,
        file_size: 0,
        rdev_major: 0,
        rdev_minor: 0,
    };
    write_record(w, &header, TRAILER_NAME, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad4_rounds_up_to_multiple_of_four() {
        assert_eq!(
            (0..9).map(pad4).collect::<Vec<_>>(),
            vec![0, 3, 2, 1, 0, 3, 2, 1, 0]
        );
    }

    #[test]
    fn trailer_is_byte_exact() {
        let mut out = Vec::new();
        let n = write_trailer(&mut out).unwrap();
        let expected = concat!(
            "070701",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000001",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "00000000",
            "0000000b",
            "00000000",
            "TRAILER!!!\0", // 110 + 11 = 121 bytes, padded to 124
            "\0\0\0",
        );
        assert_eq!(out, expected.as_bytes());
        assert_eq!(n, 124);
    }

    #[test]
    fn record_lengths_are_aligned() {
        for name_len in 1..9 {
            for data_len in 0..9 {
                let name = "n".repeat(name_len);
                let data = vec![7u8; data_len];
                let header = Header {
                    ino: 1,
                    mode: S_IFREG | 0o644,
                    nlink: 1,
                    file_size: data_len as u32,
                    rdev_major: 0,
                    rdev_minor: 0,
                };
                let mut out = Vec::new();
                let n = write_record(&mut out, &header, &name, &data).unwrap();
                assert_eq!(n as usize, out.len());
                assert_eq!(out.len() % 4, 0);
                let name_end = HEADER_LEN + name_len + 1;
                let data_start = name_end + pad4(name_end as u64) as usize;
                assert_eq!(&out[HEADER_LEN..name_end - 1], name.as_bytes());
                assert!(out[name_end - 1..data_start].iter().all(|&b| b == 0));
                assert_eq!(&out[data_start..data_start + data_len], &data[..]);
                assert!(out[data_start + data_len..].iter().all(|&b| b == 0));
            }
        }
    }
}
