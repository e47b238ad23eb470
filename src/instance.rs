//! One sclb per config. A second `sclb -c same.toml` would otherwise share the listening
//! ports through `SO_REUSEPORT` (taking half the new clients), take the admin socket over,
//! and delete the first one's socket when it stops.
//!
//! The claim is an abstract Unix socket named after the config file's canonical path: the
//! kernel frees it when the process ends however it ends (no stale lock file, nothing to
//! clean up, no directory that must be writable), and the running holder's PID is read from
//! it with `SO_PEERCRED` for the error message.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;

/// Held for the life of the process: while it is, no other sclb can claim the same config.
pub struct Claim {
    _socket: UnixListener,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "another sclb{} already runs with {config}; stop it first (or reload it: SIGHUP, \
         `sclb ctl reload`)",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Running { config: String, pid: Option<i32> },
    #[error("cannot claim {config} for this process: {source}")]
    Io { config: String, source: io::Error },
}

/// The abstract socket name for `config`: its canonical path when short enough, else a hash
/// of it (an abstract name holds 107 bytes).
fn name(config: &Path) -> Vec<u8> {
    let canonical = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let text = canonical.display().to_string();
    if text.len() <= 90 {
        format!("sclb:{text}").into_bytes()
    } else {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        format!("sclb:#{:016x}", h.finish()).into_bytes()
    }
}

/// Claims `config` for this process, or says which process has it.
pub fn claim(config: &Path) -> Result<Claim, ClaimError> {
    let shown = crate::config::reader::bounded(&config.display().to_string());
    let addr = SocketAddr::from_abstract_name(name(config)).map_err(|source| ClaimError::Io {
        config: shown.clone(),
        source,
    })?;
    match UnixListener::bind_addr(&addr) {
        Ok(socket) => Ok(Claim { _socket: socket }),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(ClaimError::Running {
            config: shown,
            pid: holder_pid(&addr),
        }),
        Err(source) => Err(ClaimError::Io {
            config: shown,
            source,
        }),
    }
}

/// The PID of the process listening on `addr`.
fn holder_pid(addr: &SocketAddr) -> Option<i32> {
    let s = UnixStream::connect_addr(addr).ok()?;
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some(cred.pid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_on_one_config_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("sclb.toml");
        std::fs::write(&cfg, "").unwrap();
        let first = claim(&cfg).unwrap();
        let e = claim(&cfg).err().expect("refused");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "").unwrap();
        assert!(claim(&other).is_ok(), "another config is another claim");
        drop(first);
        assert!(claim(&cfg).is_ok(), "free again once the holder is gone");
    }
}
