//! Socket options through `socket2`. Nice-to-have options warn once and never fail a
//! connection: a proxy that refuses traffic because keepalive could not be set is worse.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket};
use tracing::warn;

/// Keepalive probes find clients that vanished without a FIN (laptops closed, NAT expired)
/// long before a 4 h idle timeout would.
const KEEPALIVE: Duration = Duration::from_secs(60);

fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(Duration::from_secs(10))
        .with_retries(6)
}

/// Binds a listening socket: SO_REUSEADDR (restart while old connections sit in TIME_WAIT),
/// IPV6_V6ONLY on IPv6 (so "0.0.0.0" and "[::]" can be bound side by side), the backlog.
///
/// TCP_NODELAY and keepalive are set here, once: Linux copies a listener's socket options to
/// every connection it accepts, which saves five `setsockopt` calls per client.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, backlog, false)?)
}

/// [`bind`], without registering with a runtime; with `reuseport`, several sockets (one per
/// worker thread) share the address and the kernel spreads new connections over them.
pub fn bind_std(
    addr: SocketAddr,
    backlog: u32,
    reuseport: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if let Err(e) = socket
        .set_tcp_nodelay(true)
        .and_then(|_| socket.set_tcp_keepalive(&keepalive()))
    {
        warn!("{addr}: cannot set nodelay/keepalive on the listener ({e}); going on without");
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog as i32)?;
    Ok(socket.into())
}

/// A socket for a connection to a server, with no Nagle delay and keepalive, set before the
/// connect.
pub fn upstream_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let sock = SockRef::from(&socket);
    let r = sock
        .set_tcp_nodelay(true)
        .and_then(|_| sock.set_tcp_keepalive(&keepalive()));
    if let Err(e) = r
        && !WARNED.swap(true, Relaxed)
    {
        warn!("cannot set socket options (nodelay, keepalive): {e}; going on without");
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 6);
    }
}
