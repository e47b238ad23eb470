//! systemd's readiness protocol (`Type=notify`): READY=1 once every socket is bound,
//! RELOADING=1 / READY=1 around a reload, STOPPING=1 on the way out. A no-op without
//! `$NOTIFY_SOCKET`. Errors are logged at debug: a missing supervisor is not a fault.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::debug;

/// Sends one notification (e.g. "READY=1") to `$NOTIFY_SOCKET`, if set.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        // A leading '@' names a socket in the abstract namespace.
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = result {
        debug!("sd_notify {state:?} to {path}: {e}");
    }
}

/// RELOADING=1 with the monotonic timestamp systemd asks for.
pub fn reloading() {
    let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
