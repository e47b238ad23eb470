//! Reading the files sclb is pointed at (the config, the on-demand template, the state file)
//! as a careful daemon does: only a regular file, opened without blocking (a FIFO or a device
//! put at the path would otherwise hang start-up, a reload or the whole control plane), and at
//! most a bounded size, never the whole of whatever is there.

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Largest config file or template sclb reads.
pub const MAX_CONFIG: u64 = 16 << 20;

/// The bytes of the regular file at `path`, at most `max` of them. A FIFO, socket, device or
/// directory is refused at once, and so is a larger file. `follow`: whether a symbolic link at
/// `path` may be followed (a config file may be one; the state file may not).
pub fn read_regular(path: &Path, max: u64, follow: bool) -> io::Result<Vec<u8>> {
    let flags = if follow {
        libc::O_NONBLOCK
    } else {
        libc::O_NONBLOCK | libc::O_NOFOLLOW
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a directory, FIFO, socket or device)",
        ));
    }
    if m.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} bytes, more than the {max} sclb reads", m.len()),
        ));
    }
    let mut out = Vec::with_capacity(m.len() as usize);
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_regular(path, max, true)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_and_a_large_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_regular(&fifo, 100, true).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 101]).unwrap();
        assert!(read_regular(&big, 100, true).is_err());
        assert_eq!(read_regular(&big, 101, true).unwrap().len(), 101);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        assert!(read_regular(&link, 1000, false).is_err());
        assert!(read_regular(&link, 1000, true).is_ok());
    }
}
