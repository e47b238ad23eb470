//! Socket options through `socket2`. Nice-to-have options warn once and never fail a
//! connection: a proxy that refuses traffic because keepalive could not be set is worse.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// Keepalive probes find clients that vanished without a FIN (laptops closed, NAT expired)
/// long before a 4 h idle timeout would.
const KEEPALIVE: Duration = Duration::from_secs(60);

/// Binds a listening socket: SO_REUSEADDR (restart while old connections sit in TIME_WAIT),
/// IPV6_V6ONLY on IPv6 (so "0.0.0.0" and "[::]" can be bound side by side), the backlog.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog as i32)?;
    TcpListener::from_std(socket.into())
}

/// Options for an accepted or connected stream: no Nagle delay, keepalive.
pub fn tune_stream(stream: &TcpStream) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let sock = SockRef::from(stream);
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let r = sock
        .set_tcp_nodelay(true)
        .and_then(|_| sock.set_tcp_keepalive(&ka));
    if let Err(e) = r
        && !WARNED.swap(true, Relaxed)
    {
        warn!("cannot set socket options (nodelay, keepalive): {e}; going on without");
    }
}
