//! `/proc/self/mountinfo`, as the shim, the agent and the tests read it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// The mount points of this process's mount namespace, in mountinfo order (parents first).
pub fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect())
}

/// A mountinfo path field: the kernel writes space, tab, newline and backslash as octal
/// `\NNN`; anything else that looks like an escape is kept as it is.
pub fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            (b'0'..=b'3').contains(&d[0]) && d.iter().all(|c| (b'0'..=b'7').contains(c))
        });
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_decoded_and_lookalikes_kept() {
        assert_eq!(unescape("/a\\040b\\134c"), PathBuf::from("/a b\\c"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape("/x\\04"), PathBuf::from("/x\\04"));
        assert_eq!(unescape("/end\\"), PathBuf::from("/end\\"));
        assert_eq!(unescape("/plain\\9"), PathBuf::from("/plain\\9"));
        // Above 0o377 is no byte: kept as written.
        assert_eq!(unescape("/big\\777"), PathBuf::from("/big\\777"));
    }

    #[test]
    fn this_process_has_a_root_mount() {
        assert!(mount_points().unwrap().contains(&PathBuf::from("/")));
    }
}
