//! Socket options through `socket2`. Nice-to-have options warn once and never fail a
//! connection: a proxy that refuses traffic because keepalive could not be set is worse.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// Keepalive probes find clients that vanished without a FIN (laptops closed, NAT expired)
/// long before a 4 h idle timeout would; this much silence comes before the first probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
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

/// Whether another process already listens on `addr`: a probe bind without `SO_REUSEPORT`
/// fails where any listener holds the port. sclb's own listeners on a port share it through
/// `SO_REUSEPORT`, which would let a second process (a second sclb) join them silently and take
/// half the new clients; so a new address is probed before it is bound. Port 0 is never held.
pub fn held_by_another(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    let Ok(socket) = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
    else {
        return false;
    };
    let _ = socket.set_reuse_address(true);
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(true);
    }
    matches!(socket.bind(&addr.into()), Err(e) if e.kind() == io::ErrorKind::AddrInUse)
}

/// Connects to a server: a socket with no Nagle delay (a gRPC request's frames go out at
/// once) and, if asked, keepalive (four `setsockopt` calls) and a handshake whose last ACK
/// waits for the first data (`smart_connect`, one call), set before the connect.
///
/// Unlike `TcpSocket::connect`, a connect that succeeded costs no `getsockopt(SO_ERROR)`: epoll
/// reporting the socket writable with neither a hang-up nor an error means it is connected
/// (HAProxy reasons the same way); the error is read only when the connect failed.
pub async fn connect_upstream(
    addr: SocketAddr,
    keepalive_on: bool,
    smart_connect: bool,
) -> io::Result<TcpStream> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    let mut r = socket.set_tcp_nodelay(true);
    if smart_connect {
        // Out of quick-ACK mode before the handshake: Linux then delays the handshake's last
        // ACK (up to 200 ms) so that it leaves with the first data written.
        r = r.and_then(|_| socket.set_tcp_quickack(false));
    }
    if keepalive_on {
        r = r.and_then(|_| socket.set_tcp_keepalive(&keepalive()));
    }
    if let Err(e) = r
        && !WARNED.swap(true, Relaxed)
    {
        warn!("cannot set socket options (nodelay, keepalive, quickack): {e}; going on without");
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_write_closed() || ready.is_error() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::NotConnected.into()));
    }
    Ok(stream)
}

/// When a server connection last found no file descriptor (ms since [`fd_epoch`]; 0: never).
static FD_SHORT_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn fd_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// A server connection could not get a file descriptor: for the next second, listeners
/// accept a client only with one in hand for its server (see [`reserve_fd`]).
pub fn note_fd_shortage() {
    let ms = fd_epoch().elapsed().as_millis().max(1) as u64;
    FD_SHORT_AT.store(ms, Relaxed);
}

/// Whether a server connection found no file descriptor within the last second.
pub fn fd_shortage_recent() -> bool {
    let at = FD_SHORT_AT.load(Relaxed);
    at != 0 && (fd_epoch().elapsed().as_millis() as u64).saturating_sub(at) < 1000
}

/// Holds one file descriptor for the server side of a client about to be accepted, so that
/// under fd exhaustion a client is only accepted when both of its sockets fit. Accepting with
/// the last fd instead leaves the client waiting for one more; enough such clients hold every
/// fd, none can connect and none is released until `timeout queue`.
pub fn reserve_fd() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::DGRAM.cloexec(), None)
}

/// Socket errors that mean "out of resources" (descriptors, buffers, memory): back off and
/// keep going rather than fail.
pub fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 6);
    }

    #[tokio::test]
    async fn server_sockets_have_nodelay_and_keepalive_only_when_asked() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        for on in [true, false] {
            let stream = connect_upstream(addr, on, false).await.unwrap();
            let s = SockRef::from(&stream);
            assert!(s.tcp_nodelay().unwrap());
            assert_eq!(s.keepalive().unwrap(), on);
            assert_eq!(stream.peer_addr().unwrap(), addr);
        }
    }

    #[tokio::test]
    async fn a_refused_connect_reports_why() {
        // Bound but not listening: the connect is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let e = connect_upstream(addr, false, false).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }
}
