//! The admin socket: HAProxy's runtime API over a Unix socket, and [`execute`], the one place
//! where operator commands change state (the HTTP admin endpoint goes through it too).
//!
//! Wire behaviour as HAProxy's: one command per line, several separated by `;`; each reply ends
//! with an empty line; the connection closes after the first line unless `prompt` turned on
//! interactive mode, in which every reply is followed by `> `.

pub mod command;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Shared;
use crate::config::{AdminConfig, AdminLevel};
use crate::server::{AdminState, Server};
use crate::stats;
use command::{Command, StatFormat, Target, Weight};

/// Longest command line accepted; longer lines are refused, not buffered.
const MAX_LINE: usize = 64 * 1024;

/// A reply and whether the connection should close after it.
pub struct Reply {
    pub text: String,
    pub quit: bool,
    pub prompt: Option<bool>,
}

impl Reply {
    fn text(t: impl Into<String>) -> Self {
        Reply {
            text: t.into(),
            quit: false,
            prompt: None,
        }
    }
}

fn find_server(shared: &Shared, t: &Target) -> Result<Arc<Server>, String> {
    let snap = shared.state.snapshot();
    let be = snap.backend(&t.backend).ok_or("No such backend.")?;
    be.server_by_name(&t.server)
        .cloned()
        .ok_or_else(|| "No such server.".to_string())
}

/// Runs one command at `level` and returns its reply text (without the final empty line).
pub async fn execute(shared: &Arc<Shared>, cmd: Command, level: AdminLevel) -> Reply {
    if cmd.level() > level {
        return Reply::text("Permission denied\n");
    }
    match run(shared, cmd).await {
        Ok(r) => r,
        Err(e) => Reply::text(format!("{e}\n")),
    }
}

async fn run(shared: &Arc<Shared>, cmd: Command) -> Result<Reply, String> {
    let text = match cmd {
        Command::Help => command::HELP.to_string(),
        Command::Prompt => {
            return Ok(Reply {
                text: String::new(),
                quit: false,
                prompt: Some(true),
            });
        }
        Command::Quit => {
            return Ok(Reply {
                text: String::new(),
                quit: true,
                prompt: None,
            });
        }
        Command::ShowInfo => stats::info(shared),
        Command::ShowStat(fmt) => {
            let rows = stats::rows(shared);
            match fmt {
                StatFormat::Csv => stats::csv(&rows),
                StatFormat::Typed => stats::typed(&rows),
                StatFormat::Json => format!("{}\n", stats::json(&rows)),
            }
        }
        Command::ShowServersState(b) => {
            let snap = shared.state.snapshot();
            if let Some(b) = &b
                && snap.backend(b).is_none()
            {
                return Err("No such backend.".into());
            }
            stats::servers_state(&snap, b.as_deref())
        }
        Command::ShowTable { name, key } => {
            stats::table(&shared.state.snapshot(), name.as_deref(), key)?
        }
        Command::ClearTable { name, key } => {
            let snap = shared.state.snapshot();
            let t = snap
                .backend(&name)
                .and_then(|b| b.stick.clone())
                .ok_or("No such table")?;
            match key {
                Some(k) => {
                    t.unpin(k);
                }
                None => t.clear(),
            }
            info!(table = %name, key = ?key, "stick table cleared by the admin socket");
            String::new()
        }
        Command::ShowSess => shared.sessions.show(),
        Command::ShowSessions => stats::spark_sessions(shared),
        Command::KillSession(id) => {
            if !crate::gateway::kill_session(shared, &id, "by the admin socket") {
                return Err(format!("No such session '{id}'."));
            }
            String::new()
        }
        Command::SetState { target, state } => {
            let s = find_server(shared, &target)?;
            let before = s.admin_state();
            s.set_admin_state(state);
            if before != state {
                info!(
                    "server {target} is now {} (was {})",
                    state_word(state),
                    state_word(before)
                );
            }
            String::new()
        }
        Command::SetWeight { target, weight } => {
            let s = find_server(shared, &target)?;
            let w = match weight {
                Weight::Absolute(w) => w,
                Weight::Percent(p) => {
                    let w = (u64::from(s.config().weight) * u64::from(p) / 100) as u32;
                    if w > crate::config::MAX_WEIGHT {
                        return Err(format!(
                            "Absolute weight can only be between 0 and {} inclusive.",
                            crate::config::MAX_WEIGHT
                        ));
                    }
                    w
                }
            };
            s.set_weight(w);
            info!("server {target} weight set to {w}");
            String::new()
        }
        Command::SetAddr { target, ip, port } => {
            let s = find_server(shared, &target)?;
            let old = s.addr();
            let mut new = old;
            new.set_ip(ip);
            if let Some(p) = port {
                new.set_port(p);
            }
            if new == old {
                "no need to change the addr, no need to change the port by 'stats socket command'\n"
                    .to_string()
            } else {
                s.set_addr(new);
                info!("server {target} address changed from {old} to {new}");
                format!(
                    "IP changed from '{}' to '{}', port changed from '{}' to '{}' by 'stats socket command'\n",
                    old.ip(),
                    new.ip(),
                    old.port(),
                    new.port()
                )
            }
        }
        Command::SetMaxconn { target, maxconn } => {
            let s = find_server(shared, &target)?;
            s.set_maxconn(maxconn)?;
            info!("server {target} maxconn set to {maxconn}");
            String::new()
        }
        Command::Health { target, enable } => {
            let s = find_server(shared, &target)?;
            s.health.set_enabled(enable);
            info!(
                "health checks of {target} {}",
                if enable { "enabled" } else { "disabled" }
            );
            String::new()
        }
        Command::ShutdownSessions(target) => {
            let s = find_server(shared, &target)?;
            let n = s.counters.cur.load(Relaxed);
            s.shutdown_sessions();
            info!("closing {n} live connections of {target}");
            String::new()
        }
        Command::Reload => match shared.reload().await {
            Ok(summary) => format!("{summary}\n"),
            Err(e) => return Err(format!("Reload failed, the running config is kept:\n{e}")),
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
                    return Err(format!(
                        "Timeout waiting for {target} to be removable: {cur} connections left{}",
                        if s.admin_state() == AdminState::Ready {
                            " and it is still READY (drain or disable it first)"
                        } else {
                            ""
                        }
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    Ok(Reply::text(text))
}

fn state_word(s: AdminState) -> &'static str {
    match s {
        AdminState::Ready => "READY",
        AdminState::Drain => "DRAIN",
        AdminState::Maint => "MAINT",
    }
}

/// Executes a whole line (`;`-separated commands); returns the concatenated replies, each
/// ending with an empty line, and the connection's next mode.
pub async fn execute_line(
    shared: &Arc<Shared>,
    line: &str,
    level: AdminLevel,
    interactive: &mut bool,
) -> (String, bool) {
    let mut out = String::new();
    for cmd in command::split_line(line) {
        let reply = match command::parse(&cmd) {
            Ok(c) => execute(shared, c, level).await,
            Err(e) => Reply::text(format!("{e}\n")),
        };
        if reply.quit {
            return (out, true);
        }
        if let Some(p) = reply.prompt {
            *interactive = p;
        }
        out.push_str(&reply.text);
        out.push('\n');
    }
    (out, false)
}

/// Binds the admin socket so that it is never reachable with looser permissions or another
/// owner than configured: created under a umask that yields `mode`, chmod'ed and chown'ed
/// under a temporary name, then renamed over the final path.
pub fn bind(cfg: &AdminConfig) -> io::Result<UnixListener> {
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
    Ok(listener)
}

/// Serves the admin socket until `shared.stop_background` fires; removes the socket then.
pub async fn serve(listener: UnixListener, cfg: AdminConfig, shared: Arc<Shared>) {
    info!(path = %cfg.path.display(), level = ?cfg.level, "admin socket listening");
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    if crate::frontend::is_resource_exhaustion(&e) {
                        crate::frontend::ACCEPT_FAILURES.failed(&e);
                    } else {
                        warn!("admin socket accept: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shared.stop_background.cancelled() => return,
        };
        let shared = shared.clone();
        let level = cfg.level;
        tokio::spawn(
            async move {
                if let Err(e) = session(stream, &shared, level).await {
                    debug!("admin session ended: {e}");
                }
            }
            .instrument(info_span!("admin")),
        );
    }
}

/// Removes the socket file at stop, so that nobody talks to a dead process.
pub fn remove_socket(path: &Path) {
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
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            w.write_all(b"Invalid command: line too long.\n\n").await?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let (out, quit) = execute_line(shared, text.trim_end(), level, &mut interactive).await;
        w.write_all(out.as_bytes()).await?;
        if quit || !interactive {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(b"> ").await?;
    }
}
