//! The admin socket: HAProxy's runtime API over a Unix socket, and [`execute`], which runs a
//! command for the socket and for the stats listener's `POST /admin`: reads render from
//! [`crate::stats`], changes go to [`crate::control`].
//!
//! Wire behaviour as HAProxy's: one command per line, several separated by `;`; each reply ends
//! with an empty line; the connection closes after the first line unless `prompt` turned on
//! interactive mode, in which every reply is followed by `> `.

pub mod command;

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Shared;
use crate::config::{AdminConfig, AdminLevel};
use crate::control::{self, Applied, Change, ControlError, Operator};
use crate::server::{AdminState, Server};
use crate::stats::{InfoStats, Snapshot, haproxy, live};
pub use command::AdminError;
use command::{Command, StatFormat, Target, Weight};

/// Longest command line accepted; longer lines are refused, not buffered.
const MAX_LINE: usize = 64 * 1024;
/// Admin connections at once; more wait in the socket's accept queue (HAProxy's `maxconn` on
/// `stats socket`). `wait` commands hold theirs for as long as they wait.
const MAX_SESSIONS: usize = 32;
/// Time a client has to send a command line, and to take a reply (HAProxy's `stats timeout`),
/// until it sets its own with `set timeout cli`: a client that does neither frees its slot.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply and whether the connection should close after it.
pub struct Reply {
    pub text: String,
    pub quit: bool,
    pub prompt: Option<bool>,
    /// `set timeout cli`: the connection's new idle timeout.
    pub timeout: Option<Duration>,
}

impl Reply {
    fn text(t: impl Into<String>) -> Self {
        Reply {
            text: t.into(),
            quit: false,
            prompt: None,
            timeout: None,
        }
    }
}

/// The server a command names: `backend/server`, or a bare name found in exactly one backend.
fn find_server(shared: &Shared, t: &Target) -> Result<Arc<Server>, AdminError> {
    let snap = shared.state.snapshot();
    if let Some(b) = &t.backend {
        let be = snap.backend(b).ok_or(AdminError::NoSuchBackend)?;
        return be
            .server_by_name(&t.server)
            .cloned()
            .ok_or(AdminError::NoSuchServer);
    }
    let found: Vec<&Arc<Server>> = snap
        .backends
        .iter()
        .filter_map(|b| b.server_by_name(&t.server))
        .collect();
    match found.as_slice() {
        [] => Err(AdminError::NoSuchServer),
        [one] => Ok((*one).clone()),
        many => Err(AdminError::AmbiguousServer {
            name: t.server.clone(),
            candidates: many
                .iter()
                .map(|s| format!("{}/{}", s.backend, s.name))
                .collect(),
        }),
    }
}

/// Runs one command at `level`.
pub async fn execute(
    shared: &Arc<Shared>,
    cmd: Command,
    level: AdminLevel,
) -> Result<Reply, AdminError> {
    if cmd.level() > level {
        return Err(AdminError::PermissionDenied);
    }
    run(shared, cmd).await
}

impl From<ControlError> for AdminError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Reload(e) => AdminError::ReloadFailed(e),
            ControlError::NoSuchTable(_) => AdminError::NoSuchTable,
            ControlError::NoSuchSession(id) => AdminError::NoSuchSession(id),
            ControlError::NoSuchConnection(id) => AdminError::NoSuchSessionId(id),
            ControlError::NoSuchFrontend(_) => AdminError::NoSuchFrontend,
            ControlError::Invalid { what, why } => {
                AdminError::Invalid(format!("Invalid {what}: {why}"))
            }
        }
    }
}

/// Hands an operator's change to the control plane; its reply, if it has one. It answers once
/// the change is in the state file (when one is configured), so a restart right after keeps it.
async fn change(shared: &Arc<Shared>, op: Operator) -> Result<String, AdminError> {
    let text = match control::apply(shared, Change::Operator(op))? {
        Applied::Reply(text) => text,
        _ => String::new(),
    };
    shared.control.persist.durable(shared).await?;
    Ok(text)
}

async fn run(shared: &Arc<Shared>, cmd: Command) -> Result<Reply, AdminError> {
    let text = match cmd {
        Command::Help => command::HELP.to_string(),
        Command::Prompt => {
            return Ok(Reply {
                text: String::new(),
                quit: false,
                prompt: Some(true),
                timeout: None,
            });
        }
        Command::Quit => {
            return Ok(Reply {
                text: String::new(),
                quit: true,
                prompt: None,
                timeout: None,
            });
        }
        Command::ShowInfo(fmt) => {
            let info = InfoStats::take(shared);
            match fmt {
                StatFormat::Csv => haproxy::info(&info),
                StatFormat::Typed => haproxy::info_typed(&info),
                StatFormat::Json => format!("{}\n", haproxy::info_json(&info)),
            }
        }
        Command::ShowStat { format, filter } => {
            let snap = Snapshot::take(shared);
            if let Some(haproxy::ProxySel::Name(n)) = &filter.proxy
                && !snap.rows().any(|r| r.proxy_name() == n)
            {
                return Err(AdminError::NoSuchProxy);
            }
            match format {
                StatFormat::Csv => haproxy::csv_filtered(&snap, &filter),
                StatFormat::Typed => haproxy::typed_filtered(&snap, &filter),
                StatFormat::Json => format!("{}\n", haproxy::json_filtered(&snap, &filter)),
            }
        }
        Command::SetTimeoutCli(d) => {
            return Ok(Reply {
                timeout: Some(d),
                ..Reply::text("")
            });
        }
        Command::ShowServersState(b) => {
            let snap = shared.state.snapshot();
            if let Some(b) = &b
                && snap.backend(b).is_none()
            {
                return Err(AdminError::NoSuchBackend);
            }
            live::servers_state(&snap, b.as_deref())
        }
        Command::ShowTable { name, key } => {
            live::table(&shared.state.snapshot(), name.as_deref(), key)
                .map_err(|_| AdminError::NoSuchTable)?
        }
        Command::ClearTable { name, key } => {
            change(shared, Operator::ClearTable { backend: name, key }).await?
        }
        Command::ShowSess => shared.data.live_conns.show(),
        Command::ShowSessId(id) => shared
            .data
            .live_conns
            .show_one(id)
            .ok_or(AdminError::NoSuchSessionId(id))?,
        Command::ShutdownSession(id) => change(shared, Operator::ShutdownConnection { id }).await?,
        Command::ShowSessions => live::spark_sessions(shared),
        Command::ShowPool => shared.gateway.pools.show(),
        Command::KillSession(id) => {
            change(
                shared,
                Operator::KillSession {
                    id,
                    by: "by the admin socket",
                },
            )
            .await?
        }
        Command::SetState { target, state } => {
            let server = find_server(shared, &target)?;
            change(shared, Operator::SetState { server, state }).await?
        }
        Command::SetWeight { target, weight } => {
            let server = find_server(shared, &target)?;
            let weight = match weight {
                Weight::Absolute(w) => w,
                Weight::Percent(p) => {
                    let w = u64::from(server.config().weight) * u64::from(p) / 100;
                    if w > u64::from(crate::config::MAX_WEIGHT) {
                        return Err(AdminError::Invalid(format!(
                            "Absolute weight can only be between 0 and {} inclusive.",
                            crate::config::MAX_WEIGHT
                        )));
                    }
                    w as u32
                }
            };
            change(shared, Operator::SetWeight { server, weight }).await?
        }
        Command::SetAddr { target, ip, port } => {
            let server = find_server(shared, &target)?;
            change(shared, Operator::SetAddr { server, ip, port }).await?
        }
        Command::SetMaxconn { target, maxconn } => {
            let server = find_server(shared, &target)?;
            change(shared, Operator::SetMaxconn { server, maxconn }).await?
        }
        Command::Health { target, enable } => {
            let server = find_server(shared, &target)?;
            change(shared, Operator::Checks { server, enable }).await?
        }
        Command::ShutdownSessions(target) => {
            let server = find_server(shared, &target)?;
            change(shared, Operator::ShutdownSessions { server }).await?
        }
        Command::SetHealth { target, health } => {
            let server = find_server(shared, &target)?;
            if !server.health.enabled() {
                return Err(AdminError::Invalid(format!(
                    "Invalid 'set server health': {target} has no health checks (type none or disabled), so it counts as UP."
                )));
            }
            change(shared, Operator::SetHealth { server, health }).await?
        }
        Command::GetWeight(target) => {
            let s = find_server(shared, &target)?;
            format!("{} (initial {})\n", s.weight(), s.config().weight)
        }
        Command::ClearCounters { all } => change(shared, Operator::ClearCounters { all }).await?,
        Command::Frontend { name, action } => {
            change(shared, Operator::Frontend { name, action }).await?
        }
        Command::AddServer(a) => {
            let snap = shared.state.snapshot();
            let Some(be) = snap.backend(&a.backend) else {
                return Err(AdminError::NoSuchBackend);
            };
            let check = if a.check {
                be.config.check.clone()
            } else {
                crate::config::CheckConfig {
                    kind: crate::config::CheckType::None,
                    ..be.config.check.clone()
                }
            };
            let config = crate::config::ServerConfig {
                name: a.name,
                uid: None,
                addr_text: a.addr.to_string(),
                addr: a.addr,
                weight: a.weight,
                maxconn: a.maxconn,
                backup: a.backup,
                check,
            };
            change(
                shared,
                Operator::AddServer {
                    backend: a.backend,
                    config: Box::new(config),
                    enabled: a.enabled,
                },
            )
            .await?
        }
        Command::DelServer(target) => {
            let server = find_server(shared, &target)?;
            change(shared, Operator::DelServer { server }).await?
        }
        Command::SetFrontendMaxconn { name, maxconn } => {
            change(shared, Operator::SetFrontendMaxconn { name, maxconn }).await?
        }
        Command::ShowServersConn(b) => {
            let snap = shared.state.snapshot();
            if let Some(b) = &b
                && snap.backend(b).is_none()
            {
                return Err(AdminError::NoSuchBackend);
            }
            live::servers_conn(&snap, b.as_deref(), shared.data.workers.len().max(1))
        }
        Command::SetGlobalMaxconn(maxconn) => {
            change(shared, Operator::SetGlobalMaxconn { maxconn }).await?
        }
        Command::ShowVersion => format!("{}\n", env!("CARGO_PKG_VERSION")),
        Command::ShowBackend => {
            let mut out = String::from("# name\n");
            for b in &shared.state.snapshot().backends {
                out.push_str(&b.config.name);
                out.push('\n');
            }
            out
        }
        Command::Reload => match shared.reload().await {
            Ok(summary) => format!("{summary}\n"),
            Err(e) => return Err(AdminError::ReloadFailed(e)),
        },
        Command::WaitRemovable { timeout, target } => {
            let s = find_server(shared, &target)?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let (cur, queued) = (
                    s.counters.cur.load(Relaxed),
                    s.counters.queue_cur.load(Relaxed),
                );
                // Removable: no connection and no new one can arrive (not READY).
                if cur == 0 && queued == 0 && s.admin_state() != AdminState::Ready {
                    break String::new();
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(AdminError::Timeout(format!(
                        "waiting for {target} to be removable: {cur} connections left{}",
                        if s.admin_state() == AdminState::Ready {
                            " and it is still READY (drain or disable it first)"
                        } else {
                            ""
                        }
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    Ok(Reply::text(text))
}

/// What a whole line did.
pub struct LineReply {
    /// The concatenated replies, each ending with an empty line.
    pub text: String,
    /// `quit` was among the commands.
    pub quit: bool,
    /// The first command that failed, if one did (its text is in `text` too).
    pub error: Option<AdminError>,
    /// The connection's idle timeout, if a `set timeout cli` changed it.
    pub timeout: Option<Duration>,
}

/// Executes a whole line (`;`-separated commands) and updates the connection's mode.
pub async fn execute_line(
    shared: &Arc<Shared>,
    line: &str,
    level: AdminLevel,
    interactive: &mut bool,
) -> LineReply {
    let mut out = LineReply {
        text: String::new(),
        quit: false,
        error: None,
        timeout: None,
    };
    for cmd in command::split_line(line) {
        let result = match command::parse(&cmd) {
            Ok(c) => execute(shared, c, level).await,
            Err(e) => Err(e),
        };
        let reply = match result {
            Ok(r) => r,
            Err(e) => {
                let r = Reply::text(format!("{e}\n"));
                out.error.get_or_insert(e);
                r
            }
        };
        if reply.quit {
            out.quit = true;
            return out;
        }
        if let Some(p) = reply.prompt {
            *interactive = p;
        }
        if let Some(t) = reply.timeout {
            out.timeout = Some(t);
        }
        out.text.push_str(&reply.text);
        out.text.push('\n');
    }
    out
}

/// Binds the admin socket so that it is never reachable with looser permissions or another
/// owner than configured: created under a umask that yields `mode`, chmod'ed and chown'ed
/// under a temporary name, then renamed over the final path.
///
/// A socket at the path that a live process answers on is another sclb's (or another
/// program's): refused, never taken over. A dead one (left by a crash) is replaced.
pub fn bind(cfg: &AdminConfig) -> io::Result<(UnixListener, SocketFile)> {
    if std::os::unix::net::UnixStream::connect(&cfg.path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a running process (another sclb?) answers on it; stop it or use another path",
        ));
    }
    let tmp: PathBuf = {
        let mut p = cfg.path.clone().into_os_string();
        p.push(format!(".{}.tmp", std::process::id()));
        p.into()
    };
    let _ = std::fs::remove_file(&tmp);
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(!cfg.mode & 0o777));
    let listener = UnixListener::bind(&tmp);
    nix::sys::stat::umask(old);
    let listener = listener?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(cfg.mode))?;
    if cfg.uid.is_some() || cfg.gid.is_some() {
        std::os::unix::fs::chown(&tmp, cfg.uid, cfg.gid)?;
    }
    std::fs::rename(&tmp, &cfg.path)?;
    let m = std::fs::symlink_metadata(&cfg.path)?;
    Ok((
        listener,
        SocketFile {
            path: cfg.path.clone(),
            id: (m.dev(), m.ino()),
        },
    ))
}

/// The admin socket file this process created: its path, and its identity (device, inode) so
/// that sclb never removes a socket another process put at the same path.
#[derive(Debug, Clone)]
pub struct SocketFile {
    pub path: PathBuf,
    id: (u64, u64),
}

/// Serves the admin socket until `shared.life.stop_background` fires; removes the socket then.
pub async fn serve(listener: UnixListener, cfg: AdminConfig, shared: Arc<Shared>) {
    info!(path = %cfg.path.display(), level = ?cfg.level, "admin socket listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
    loop {
        let slot = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = shared.life.stop_background.cancelled() => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    if crate::sockopt::is_resource_exhaustion(&e) {
                        crate::frontend::ACCEPT_FAILURES.failed(&e);
                    } else {
                        warn!("admin socket accept: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shared.life.stop_background.cancelled() => return,
        };
        let shared = shared.clone();
        let level = cfg.level;
        tokio::spawn(
            async move {
                if let Err(e) = session(stream, &shared, level).await {
                    debug!("admin session ended: {e}");
                }
                drop(slot);
            }
            .instrument(info_span!("admin")),
        );
    }
}

/// Removes the socket file at stop, so that nobody talks to a dead process; only if it is
/// still the one this process created.
pub fn remove_socket(file: &SocketFile) {
    let path = &file.path;
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == file.id => {}
        Ok(_) => {
            warn!(
                "admin socket {} is not the one this sclb created: leaving it",
                path.display()
            );
            return;
        }
        Err(_) => return,
    }
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!("cannot remove admin socket {}: {e}", path.display());
    }
}

async fn session(stream: UnixStream, shared: &Arc<Shared>, level: AdminLevel) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut interactive = false;
    let mut idle = IO_TIMEOUT;
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut r).take(MAX_LINE as u64 + 1);
        let n = tokio::time::timeout(idle, limited.read_until(b'\n', &mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no command in time"))??;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            w.write_all(b"Invalid command: line too long.\n\n").await?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let out = execute_line(shared, text.trim_end(), level, &mut interactive).await;
        if let Some(t) = out.timeout {
            idle = t;
        }
        tokio::time::timeout(idle, w.write_all(out.text.as_bytes()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply not read in time"))??;
        if out.quit || !interactive {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(b"> ").await?;
    }
}
