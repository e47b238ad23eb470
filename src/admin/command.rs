//! Parsing admin command lines (HAProxy's runtime API) into [`Command`]s, and the typed
//! [`AdminError`] every command can end in.
//!
//! Error texts follow HAProxy's where HAProxy has one ("No such server.", "Require
//! 'backend/server'.", "Permission denied"), so operators' scripts that grep for them keep
//! working. Callers in the process act on the error's variant; only `sclb ctl`, which sees the
//! socket's text, recognises an error reply by its first words ([`is_error`]).

use std::net::IpAddr;
use std::time::Duration;

use crate::config::{AdminLevel, MAX_WEIGHT};
use crate::control::FrontendAction;
use crate::server::{AdminState, ForcedHealth};
use crate::stats::haproxy::{ProxySel, StatFilter};

/// `backend/server`, or a bare server name that is unique across backends (as the EMR
/// runbook writes `disable server sc1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub backend: Option<String>,
    pub server: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Typed by the operator (or a script): quoted bounded and escaped in replies.
        let b = crate::config::reader::bounded;
        match &self.backend {
            Some(be) => write!(f, "{}/{}", b(be), b(&self.server)),
            None => f.write_str(&b(&self.server)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatFormat {
    Csv,
    Typed,
    Json,
}

/// `add server`'s arguments, as HAProxy's keywords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddServer {
    pub backend: String,
    pub name: String,
    pub addr: std::net::SocketAddr,
    pub weight: u32,
    pub maxconn: Option<usize>,
    pub backup: bool,
    /// `check`: health checks as the backend's.
    pub check: bool,
    /// `enabled`: READY at once (HAProxy's dynamic servers start in maintenance otherwise).
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    Absolute(u32),
    /// Percent of the configured weight.
    Percent(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Prompt,
    Quit,
    ShowInfo(StatFormat),
    ShowStat {
        format: StatFormat,
        filter: StatFilter,
    },
    /// `set timeout cli <delay>`: this connection's idle timeout (hatop sends it), at most
    /// 2^31 ms as every duration.
    SetTimeoutCli(Duration),
    ShowServersState(Option<String>),
    ShowTable {
        name: Option<String>,
        key: Option<IpAddr>,
    },
    ClearTable {
        name: String,
        key: Option<IpAddr>,
    },
    ShowSess,
    /// `show sess <id>`: one connection.
    ShowSessId(u64),
    /// `shutdown session <id>`: close one connection.
    ShutdownSession(u64),
    /// Gateway: live Spark sessions.
    ShowSessions,
    /// Gateway: the warm pools of on-demand drivers.
    ShowPool,
    /// Gateway: end a Spark session (its streams close, sclb releases it on its server).
    KillSession(String),
    SetState {
        target: Target,
        state: AdminState,
    },
    SetWeight {
        target: Target,
        weight: Weight,
    },
    SetAddr {
        target: Target,
        ip: IpAddr,
        port: Option<u16>,
    },
    SetMaxconn {
        target: Target,
        maxconn: u64,
    },
    Health {
        target: Target,
        enable: bool,
    },
    ShutdownSessions(Target),
    SetHealth {
        target: Target,
        health: ForcedHealth,
    },
    GetWeight(Target),
    ClearCounters {
        all: bool,
    },
    ShowVersion,
    ShowBackend,
    Frontend {
        name: String,
        action: FrontendAction,
    },
    SetGlobalMaxconn(usize),
    /// `set maxconn frontend <fe> <n>`.
    SetFrontendMaxconn {
        name: String,
        maxconn: usize,
    },
    /// `show servers conn [<backend>]`.
    ShowServersConn(Option<String>),
    /// `add server <b>/<s> <addr> [weight <w>] [maxconn <n>] [backup] [check] [enabled]`.
    AddServer(AddServer),
    /// `del server <b>/<s>`.
    DelServer(Target),
    Reload,
    WaitRemovable {
        timeout: Duration,
        target: Target,
    },
}

impl Command {
    /// The least socket level allowed to run it. `user` only reads; `operator` may also clear
    /// pins; `admin` may change servers and reload.
    pub fn level(&self) -> AdminLevel {
        match self {
            Command::Help
            | Command::Prompt
            | Command::Quit
            | Command::ShowInfo(_)
            | Command::ShowStat { .. }
            | Command::SetTimeoutCli(_)
            | Command::ShowServersState(_)
            | Command::ShowServersConn(_)
            | Command::ShowTable { .. }
            | Command::ShowSess
            | Command::ShowSessId(_)
            | Command::ShowSessions
            | Command::ShowPool
            | Command::GetWeight(_)
            | Command::ShowVersion
            | Command::ShowBackend
            | Command::WaitRemovable { .. } => AdminLevel::User,
            Command::ClearTable { .. }
            | Command::KillSession(_)
            | Command::ClearCounters { all: false } => AdminLevel::Operator,
            _ => AdminLevel::Admin,
        }
    }
}

/// Why a command was refused or failed. The text is HAProxy's where HAProxy has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("Unknown command '{0}'. Type 'help' for the list of commands.")]
    UnknownCommand(String),
    /// An argument is missing or in the wrong place: the text says what the command wants.
    #[error("{0}")]
    Usage(String),
    /// An argument is there but its value is not acceptable.
    #[error("{0}")]
    Invalid(String),
    #[error("No such backend.")]
    NoSuchBackend,
    #[error("No such server.")]
    NoSuchServer,
    #[error("No such frontend.")]
    NoSuchFrontend,
    /// `show stat <proxy> ...` naming no proxy (HAProxy's words).
    #[error("No such proxy.")]
    NoSuchProxy,
    /// A bare server name that more than one backend has.
    #[error("Require 'backend/server': '{}' is a server of several backends: {}.", crate::config::reader::bounded(.name), .candidates.join(", "))]
    AmbiguousServer {
        name: String,
        candidates: Vec<String>,
    },
    #[error("No such table")]
    NoSuchTable,
    #[error("No such session '{0}'.")]
    NoSuchSession(String),
    /// A client connection id (`show sess`) that is not live.
    #[error("No such session id 0x{0:x}.")]
    NoSuchSessionId(u64),
    #[error("Permission denied")]
    PermissionDenied,
    #[error("Timeout {0}")]
    Timeout(String),
    #[error("Reload failed, the running config is kept:\n{0}")]
    ReloadFailed(String),
    /// The change is made but not in the state file: a restart would undo it.
    #[error("Not saved: the change is made, but {0}; a restart now would undo it (see the log).")]
    NotSaved(&'static str),
}

impl From<crate::persist::NotDurable> for AdminError {
    fn from(e: crate::persist::NotDurable) -> Self {
        AdminError::NotSaved(match e {
            crate::persist::NotDurable::Failed => "the state file could not be written",
            crate::persist::NotDurable::Slow => "the state file was not written within 10 s",
        })
    }
}

impl AdminError {
    /// `sclb ctl` tells an error by its first words, so the parser's free texts must start
    /// with one of [`ERROR_PREFIXES`] (checked here in debug builds and by the fuzzer).
    fn usage(s: impl Into<String>) -> Self {
        let s = s.into();
        debug_assert!(is_error(&s), "an admin error without a known prefix: {s}");
        AdminError::Usage(s)
    }

    fn invalid(s: impl Into<String>) -> Self {
        let s = s.into();
        debug_assert!(is_error(&s), "an admin error without a known prefix: {s}");
        AdminError::Invalid(s)
    }
}

/// The first words of every error reply: how `sclb ctl` tells an error from a normal reply
/// on the socket's text protocol (a test checks that every [`AdminError`] starts with one).
pub const ERROR_PREFIXES: &[&str] = &[
    "Unknown command",
    "Require ",
    "No such ",
    "Permission denied",
    "Invalid ",
    "Absolute weight",
    "Relative weight",
    "'set server",
    "Timeout",
    "Reload failed",
    "Missing ",
    "Not saved",
];

/// Whether a reply is an error, by its first line.
pub fn is_error(reply: &str) -> bool {
    ERROR_PREFIXES.iter().any(|p| reply.starts_with(p))
}

/// The command list `help` prints.
pub const HELP: &str = "\
The following commands are valid at this level:
  help                                    : this list
  prompt                                  : toggle interactive mode with prompt
  quit                                    : disconnect
  show info                               : report information about the running process
  show stat                               : report counters for each proxy and server (HAProxy CSV)
  show servers state [<backend>]          : dump volatile server information
  show table [<table>] [key <ip>]         : report table usage or dump a table's entries
  show sess [<id>]                        : list live client connections (or one)
  shutdown session <id>                   : close one client connection
  show sessions                           : list live Spark sessions (gateway frontends)
  show pool                               : warm pools of on-demand drivers and their members
  kill session <session_id>               : end a Spark session and close its streams
  clear table <table> [key <ip>]          : remove all pins of a table, or one
  (<bk>/<srv> may be a bare <srv> when that server name is in one backend only)
  disable server <bk>/<srv>               : put a server in maintenance (MAINT)
  enable server <bk>/<srv>                : take a server out of maintenance (READY)
  set server <bk>/<srv> state <state>     : ready, drain or maint
  set server <bk>/<srv> weight <w>[%]     : change a server's weight
  set weight <bk>/<srv> <w>[%]            : change a server's weight
  set server <bk>/<srv> addr <ip> [port <p>] : change a server's address
  set maxconn server <bk>/<srv> <n>       : change a server's maxconn (0: no limit)
  disable health <bk>/<srv>               : stop a server's health checks
  enable health <bk>/<srv>                : start a server's health checks
  shutdown sessions server <bk>/<srv>     : close every connection to a server
  wait <timeout> srv-removable <bk>/<srv> : wait until a server has no connection left
  set server <bk>/<srv> health <h>        : force its health: up, stopping or down
  get weight <bk>/<srv>                   : report a server's current and initial weight
  clear counters [all]                    : reset max values (all: every counter)
  show version                            : report sclb's version
  disable frontend <fe>                   : stop accepting on a frontend (clients wait)
  enable frontend <fe>                    : accept again
  shutdown frontend <fe>                  : close a frontend's listeners until the next reload
  set maxconn global <n>                  : change the global maxconn
  set maxconn frontend <fe> <n>           : change a frontend's maxconn
  show servers conn [<backend>]           : servers' current and idle connections
  add server <bk>/<srv> <ip:port> [weight <w>] [maxconn <n>] [backup] [check] [enabled]
                                          : add a server (MAINT unless 'enabled'; gone at reload)
  del server <bk>/<srv>                   : delete a server 'add server' added (in MAINT, idle)
  show stat [{<iid>|<px>} <type> <sid>] [typed|json] [up|no-maint] : a selection of show stat
  show info [typed|json]                  : show info in HAProxy's typed or JSON form
  show backend                            : list the backends
  reload                                  : reload the configuration file
";

/// Splits a line into commands at unescaped `;`, as HAProxy does (`\;` is a literal `;`).
pub fn split_line(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&';') => {
                out.last_mut().unwrap().push(';');
                chars.next();
            }
            ';' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Largest `set maxconn server` value: the config's own bound.
const MAX_SERVER_MAXCONN: u64 = 1_000_000;

fn target(word: Option<&&str>) -> Result<Target, AdminError> {
    let w = word.ok_or_else(|| AdminError::usage("Require 'backend/server'."))?;
    match w.split_once('/') {
        Some((b, s)) if !b.is_empty() && !s.is_empty() => Ok(Target {
            backend: Some(b.to_string()),
            server: s.to_string(),
        }),
        None if !w.is_empty() => Ok(Target {
            backend: None,
            server: w.to_string(),
        }),
        _ => Err(AdminError::usage("Require 'backend/server'.")),
    }
}

/// A connection id as `show sess` prints it (`0x1f`), or in decimal.
fn sess_id(w: &str) -> Result<u64, AdminError> {
    let parsed = match w.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => w.parse(),
    };
    parsed.map_err(|_| {
        AdminError::invalid(format!(
            "Invalid session id '{}': expected an id as 'show sess' prints it (0x1f).",
            crate::config::reader::bounded(w)
        ))
    })
}

fn weight(word: Option<&&str>) -> Result<Weight, AdminError> {
    let w = word.ok_or_else(|| AdminError::usage("Require <weight> or <weight%>."))?;
    if let Some(p) = w.strip_suffix('%') {
        return match p.parse::<u32>() {
            Ok(n) => Ok(Weight::Percent(n)),
            Err(_) => Err(AdminError::invalid(
                "Relative weight must be a positive integer percentage.",
            )),
        };
    }
    match w.parse::<u32>() {
        Ok(n) if n <= MAX_WEIGHT => Ok(Weight::Absolute(n)),
        _ => Err(AdminError::invalid(format!(
            "Absolute weight can only be between 0 and {MAX_WEIGHT} inclusive."
        ))),
    }
}

fn key(words: &[&str]) -> Result<Option<IpAddr>, AdminError> {
    match words {
        [] => Ok(None),
        ["key", ip] => ip.parse().map(Some).map_err(|_| {
            AdminError::invalid(format!(
                "Invalid key '{}': expected an IPv4 or IPv6 address.",
                crate::config::reader::bounded(ip)
            ))
        }),
        _ => Err(AdminError::usage(
            "Invalid table filter: expected 'key <ip>'.",
        )),
    }
}

/// `show info [typed|json] [desc]`.
fn info_format(words: &[&str]) -> Result<StatFormat, AdminError> {
    let mut format = StatFormat::Csv;
    for w in words {
        match *w {
            "typed" => format = StatFormat::Typed,
            "json" => format = StatFormat::Json,
            "desc" | "float" => {}
            _ => {
                return Err(AdminError::invalid(
                    "Invalid 'show info' argument: expected 'typed', 'json', 'desc' or 'float'.",
                ));
            }
        }
    }
    Ok(format)
}

/// `show stat [domain proxy] [{<iid>|<proxy>} <type> <sid>] [typed|json] [desc] [up|no-maint]`.
fn show_stat(mut w: &[&str]) -> Result<Command, AdminError> {
    let bad = |what: &str| {
        AdminError::invalid(format!(
            "Invalid 'show stat' argument: {what}; expected [{{<iid>|<proxy>}} <type> <sid>] [typed|json] [desc] [up|no-maint]."
        ))
    };
    let mut filter = StatFilter::default();
    if let ["domain", d, rest @ ..] = w {
        if *d != "proxy" {
            return Err(bad("sclb has only the 'proxy' domain"));
        }
        w = rest;
    }
    // A selector is three words, the second and third numbers.
    if let [p, t, sid, rest @ ..] = w
        && let (Ok(t), Ok(sid)) = (t.parse::<i64>(), sid.parse::<i64>())
    {
        filter.proxy = match p.parse::<i64>() {
            Ok(-1) => None,
            Ok(id) if id > 0 => Some(ProxySel::Id(id as usize)),
            Ok(_) => return Err(bad("a proxy id is -1 or positive")),
            Err(_) => Some(ProxySel::Name(p.to_string())),
        };
        filter.types = match t {
            -1 => 7,
            1..=7 => t as u32,
            _ => return Err(bad("the type is -1 or a sum of 1, 2 and 4")),
        };
        filter.sid = match sid {
            -1 => None,
            0.. => Some(sid as u32),
            _ => return Err(bad("a server id is -1 or positive")),
        };
        w = rest;
    }
    let mut format = StatFormat::Csv;
    for word in w {
        match *word {
            "typed" => format = StatFormat::Typed,
            "json" => format = StatFormat::Json,
            "desc" => {}
            "up" => filter.up = true,
            "no-maint" => filter.no_maint = true,
            other => {
                return Err(bad(&format!("'{}'", crate::config::reader::bounded(other))));
            }
        }
    }
    Ok(Command::ShowStat { format, filter })
}

/// `add server <b>/<s> <ip:port> [keywords]`: the keywords of HAProxy's list that mean
/// something to sclb.
fn add_server(t: &str, words: &[&str]) -> Result<AddServer, AdminError> {
    let Some((backend, name)) = t
        .split_once('/')
        .filter(|(b, s)| !b.is_empty() && !s.is_empty())
    else {
        return Err(AdminError::usage("Require 'backend/server'."));
    };
    let bounded = crate::config::reader::bounded;
    let Some((addr, mut rest)) = words.split_first() else {
        return Err(AdminError::usage(
            "Missing address: 'add server <b>/<s> <ip:port> [weight <w>] [maxconn <n>] [backup] [check] [enabled]'.",
        ));
    };
    let addr = addr.parse().map_err(|_| {
        AdminError::invalid(format!(
            "Invalid addr '{}': expected <ip>:<port>.",
            bounded(addr)
        ))
    })?;
    let mut s = AddServer {
        backend: backend.into(),
        name: name.into(),
        addr,
        weight: 1,
        maxconn: None,
        backup: false,
        check: false,
        enabled: false,
    };
    let number = |k: &str, v: Option<&&str>| -> Result<u64, AdminError> {
        v.and_then(|v| v.parse().ok())
            .ok_or_else(|| AdminError::invalid(format!("Invalid {k}: expected a number.")))
    };
    while let Some((k, tail)) = rest.split_first() {
        rest = tail;
        match *k {
            "weight" => {
                let w = number("weight", rest.first())?;
                if w > u64::from(MAX_WEIGHT) {
                    return Err(AdminError::invalid(format!(
                        "Absolute weight can only be between 0 and {MAX_WEIGHT} inclusive."
                    )));
                }
                s.weight = w as u32;
                rest = &rest[1..];
            }
            "maxconn" => {
                s.maxconn = Some(number("maxconn", rest.first())? as usize).filter(|&m| m > 0);
                rest = &rest[1..];
            }
            "backup" => s.backup = true,
            "check" => s.check = true,
            "enabled" => s.enabled = true,
            "disabled" => s.enabled = false,
            other => {
                return Err(AdminError::invalid(format!(
                    "Invalid 'add server' keyword '{}': sclb knows weight, maxconn, backup, check, enabled and disabled.",
                    bounded(other)
                )));
            }
        }
    }
    Ok(s)
}

/// Parses one command (no `;`).
pub fn parse(cmd: &str) -> Result<Command, AdminError> {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    let c = match w.as_slice() {
        ["help", ..] => Command::Help,
        ["prompt"] => Command::Prompt,
        ["quit"] => Command::Quit,
        ["show", "info", rest @ ..] => Command::ShowInfo(info_format(rest)?),
        ["show", "stat", rest @ ..] => show_stat(rest)?,
        ["set", "timeout", "cli", t] => {
            // HAProxy's form is a number of seconds; a duration with a unit is taken too.
            let d = crate::config::reader::parse_duration(t).or_else(|e| {
                t.parse::<u64>()
                    .map(Duration::from_secs)
                    .map_err(|_| e)
                    .and_then(|d| {
                        if d <= crate::config::reader::MAX_DURATION {
                            Ok(d)
                        } else {
                            Err("longer than 2^31 ms".to_string())
                        }
                    })
            });
            match d {
                Ok(d) if !d.is_zero() => Command::SetTimeoutCli(d),
                _ => {
                    return Err(AdminError::invalid(format!(
                        "Invalid timeout '{}': expected seconds (or a duration such as 30m), \
                         more than zero and at most 2^31 ms.",
                        crate::config::reader::bounded(t)
                    )));
                }
            }
        }
        ["show", "servers", "state"] => Command::ShowServersState(None),
        ["show", "servers", "state", b] => Command::ShowServersState(Some(b.to_string())),
        ["show", "table"] => Command::ShowTable {
            name: None,
            key: None,
        },
        ["show", "table", name, rest @ ..] => Command::ShowTable {
            name: Some(name.to_string()),
            key: key(rest)?,
        },
        ["clear", "table", name, rest @ ..] => Command::ClearTable {
            name: name.to_string(),
            key: key(rest)?,
        },
        ["clear", "table"] => {
            return Err(AdminError::usage(
                "Missing table name: 'clear table <table> [key <ip>]'.",
            ));
        }
        ["show", "sessions"] => Command::ShowSessions,
        ["show", "pool"] => Command::ShowPool,
        ["show", "sess"] => Command::ShowSess,
        ["show", "sess", id] => Command::ShowSessId(sess_id(id)?),
        ["shutdown", "session", id] => Command::ShutdownSession(sess_id(id)?),
        ["shutdown", "session", ..] => {
            return Err(AdminError::usage(
                "Require 'session id': 'shutdown session <id>' (an id 'show sess' prints).",
            ));
        }
        ["kill", "session", id] => Command::KillSession(id.to_string()),
        ["kill", "session", ..] => {
            return Err(AdminError::usage(
                "Require 'session_id': 'kill session <session_id>'.",
            ));
        }
        ["disable", "server", rest @ ..] => Command::SetState {
            target: target(rest.first())?,
            state: AdminState::Maint,
        },
        ["enable", "server", rest @ ..] => Command::SetState {
            target: target(rest.first())?,
            state: AdminState::Ready,
        },
        ["set", "server", t, "state", s, ..] => Command::SetState {
            target: target(Some(t))?,
            state: match *s {
                "ready" => AdminState::Ready,
                "drain" => AdminState::Drain,
                "maint" => AdminState::Maint,
                _ => {
                    return Err(AdminError::usage(
                        "'set server <srv> state' expects 'ready', 'drain' and 'maint'.",
                    ));
                }
            },
        },
        ["set", "server", _, "state"] => {
            return Err(AdminError::usage(
                "'set server <srv> state' expects 'ready', 'drain' and 'maint'.",
            ));
        }
        ["set", "server", t, "weight", rest @ ..] | ["set", "weight", t, rest @ ..] => {
            Command::SetWeight {
                target: target(Some(t))?,
                weight: weight(rest.first())?,
            }
        }
        ["set", "server", t, "addr", ip, rest @ ..] => Command::SetAddr {
            target: target(Some(t))?,
            ip: ip.parse().map_err(|_| {
                AdminError::invalid(format!(
                    "Invalid addr '{}': expected an IP address.",
                    crate::config::reader::bounded(ip)
                ))
            })?,
            port: match rest {
                [] => None,
                ["port", p] => Some(p.parse().map_err(|_| {
                    AdminError::invalid(format!(
                        "Invalid port '{}'.",
                        crate::config::reader::bounded(p)
                    ))
                })?),
                _ => {
                    return Err(AdminError::invalid(
                        "Invalid arguments: 'set server <bk>/<srv> addr <ip> [port <p>]'.",
                    ));
                }
            },
        },
        ["set", "server", t, "health", h] => Command::SetHealth {
            target: target(Some(t))?,
            health: match *h {
                "up" => ForcedHealth::Up,
                "stopping" => ForcedHealth::Stopping,
                "down" => ForcedHealth::Down,
                _ => {
                    return Err(AdminError::usage(
                        "'set server <srv> health' expects 'up', 'stopping', or 'down'.",
                    ));
                }
            },
        },
        ["set", "server", _, ..] => {
            return Err(AdminError::usage(
                "'set server <srv>' only supports 'state', 'weight', 'addr' and 'health'.",
            ));
        }
        ["set", "maxconn", "server", t, n] => Command::SetMaxconn {
            target: target(Some(t))?,
            maxconn: match n.parse::<u64>() {
                Ok(v) if v <= MAX_SERVER_MAXCONN => v,
                _ => {
                    return Err(AdminError::invalid(format!(
                        "Invalid maxconn '{}': expected an integer from 0 (no limit) to \
                         {MAX_SERVER_MAXCONN}.",
                        crate::config::reader::bounded(n)
                    )));
                }
            },
        },
        ["disable", "health", rest @ ..] => Command::Health {
            target: target(rest.first())?,
            enable: false,
        },
        ["enable", "health", rest @ ..] => Command::Health {
            target: target(rest.first())?,
            enable: true,
        },
        ["shutdown", "sessions", "server", rest @ ..] => {
            Command::ShutdownSessions(target(rest.first())?)
        }
        ["get", "weight", rest @ ..] => Command::GetWeight(target(rest.first())?),
        ["clear", "counters"] => Command::ClearCounters { all: false },
        ["clear", "counters", "all"] => Command::ClearCounters { all: true },
        ["show", "version"] => Command::ShowVersion,
        ["disable", "frontend", name] => Command::Frontend {
            name: name.to_string(),
            action: FrontendAction::Pause,
        },
        ["enable", "frontend", name] => Command::Frontend {
            name: name.to_string(),
            action: FrontendAction::Resume,
        },
        ["shutdown", "frontend", name] => Command::Frontend {
            name: name.to_string(),
            action: FrontendAction::Shutdown,
        },
        ["disable" | "enable" | "shutdown", "frontend", ..] => {
            return Err(AdminError::usage(
                "Require a frontend name: '<disable|enable|shutdown> frontend <fe>'.",
            ));
        }
        ["set", "maxconn", "global", n] => Command::SetGlobalMaxconn(match n.parse::<usize>() {
            Ok(v) if (1..=10_000_000).contains(&v) => v,
            _ => {
                return Err(AdminError::invalid(format!(
                    "Invalid maxconn '{}': expected an integer from 1 to 10000000.",
                    crate::config::reader::bounded(n)
                )));
            }
        }),
        ["show", "backend"] => Command::ShowBackend,
        ["add", "server", t, rest @ ..] => Command::AddServer(add_server(t, rest)?),
        ["add", "server"] => return Err(AdminError::usage("Require 'backend/server'.")),
        ["del", "server", t] => {
            let t = target(Some(t))?;
            if t.backend.is_none() {
                return Err(AdminError::usage("Require 'backend/server'."));
            }
            Command::DelServer(t)
        }
        ["del", "server", ..] => return Err(AdminError::usage("Require 'backend/server'.")),
        ["show", "servers", "conn"] => Command::ShowServersConn(None),
        ["show", "servers", "conn", b] => Command::ShowServersConn(Some(b.to_string())),
        ["set", "maxconn", "frontend", name, n] => Command::SetFrontendMaxconn {
            name: name.trim_start_matches('#').to_string(),
            maxconn: match n.parse::<usize>() {
                Ok(v) if v <= 10_000_000 => v,
                _ => {
                    return Err(AdminError::invalid(format!(
                        "Invalid maxconn '{}': expected an integer from 0 to 10000000.",
                        crate::config::reader::bounded(n)
                    )));
                }
            },
        },
        ["set", "maxconn", "frontend", ..] => {
            return Err(AdminError::usage(
                "Require a frontend name and a value: 'set maxconn frontend <fe> <n>'.",
            ));
        }
        ["reload"] => Command::Reload,
        ["wait", t, "srv-removable", srv] => Command::WaitRemovable {
            timeout: crate::config::reader::parse_duration(t)
                .map_err(|e| AdminError::invalid(format!("Invalid wait timeout: {e}")))?,
            target: target(Some(srv))?,
        },
        ["wait", ..] => {
            return Err(AdminError::invalid(
                "Invalid arguments: 'wait <timeout> srv-removable <bk>/<srv>'.",
            ));
        }
        _ => {
            // Quoted bounded and escaped: a reply is one line, whatever the client sent.
            return Err(AdminError::UnknownCommand(crate::config::reader::bounded(
                cmd,
            )));
        }
    };
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(b: &str, s: &str) -> Target {
        Target {
            backend: Some(b.into()),
            server: s.into(),
        }
    }

    #[test]
    fn parses_the_runbook_commands() {
        assert_eq!(
            parse("disable server sparkconnect_servers/sc1"),
            Ok(Command::SetState {
                target: t("sparkconnect_servers", "sc1"),
                state: AdminState::Maint
            })
        );
        assert_eq!(
            parse("disable server sc1"),
            Ok(Command::SetState {
                target: Target {
                    backend: None,
                    server: "sc1".into()
                },
                state: AdminState::Maint
            })
        );
        assert_eq!(
            parse("set server b/s state drain"),
            Ok(Command::SetState {
                target: t("b", "s"),
                state: AdminState::Drain
            })
        );
        assert_eq!(
            parse("set weight b/s 50%"),
            Ok(Command::SetWeight {
                target: t("b", "s"),
                weight: Weight::Percent(50)
            })
        );
        assert_eq!(
            parse("set server b/s addr 10.0.0.1 port 15003"),
            Ok(Command::SetAddr {
                target: t("b", "s"),
                ip: "10.0.0.1".parse().unwrap(),
                port: Some(15003)
            })
        );
        assert_eq!(
            parse("wait 10m srv-removable b/s"),
            Ok(Command::WaitRemovable {
                timeout: Duration::from_secs(600),
                target: t("b", "s")
            })
        );
        assert_eq!(
            parse("show table b key ::1"),
            Ok(Command::ShowTable {
                name: Some("b".into()),
                key: Some("::1".parse().unwrap())
            })
        );
    }

    #[test]
    fn errors_are_haproxy_worded_and_recognisable() {
        for (line, want) in [
            ("disable server", "Require 'backend/server'."),
            ("disable server b/", "Require 'backend/server'."),
            (
                "set server b/s state bogus",
                "'set server <srv> state' expects",
            ),
            (
                "set weight b/s 300",
                "Absolute weight can only be between 0 and 256",
            ),
            ("frobnicate", "Unknown command 'frobnicate'"),
            ("show table b key nope", "Invalid key 'nope'"),
            ("set maxconn server b/s many", "Invalid maxconn"),
            ("wait soon srv-removable b/s", "Invalid wait timeout"),
        ] {
            let e = parse(line).unwrap_err().to_string();
            assert!(e.starts_with(want), "{line}: {e}");
            assert!(is_error(&e), "{line}: {e} has no known error prefix");
        }
    }

    /// `sclb ctl` exits 1 on an error reply: it must recognise every error the process sends.
    #[test]
    fn every_error_reply_is_recognised_as_one() {
        for e in [
            AdminError::UnknownCommand("x".into()),
            AdminError::NoSuchBackend,
            AdminError::NoSuchServer,
            AdminError::NoSuchFrontend,
            AdminError::NoSuchProxy,
            AdminError::AmbiguousServer {
                name: "s".into(),
                candidates: vec!["a/s".into(), "b/s".into()],
            },
            AdminError::NoSuchTable,
            AdminError::NoSuchSession("s".into()),
            AdminError::NoSuchSessionId(0x1f),
            AdminError::PermissionDenied,
            AdminError::Timeout("waiting".into()),
            AdminError::ReloadFailed("x".into()),
            AdminError::NotSaved("x"),
        ] {
            assert!(is_error(&e.to_string()), "{e}");
        }
        // Usage and Invalid carry the parser's texts: every one it can produce is recognised.
        // The cases come from `help` itself, so a new command is covered when it is listed:
        // each synopsis cut after every word, and with its placeholders filled with bad values.
        let mut lines: Vec<String> = ["frob\nnicate", "show sess 0xzz", "shutdown session nope"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for help in HELP.lines().skip(1) {
            let synopsis = help.split(" : ").next().unwrap_or("").trim();
            if synopsis.is_empty() || synopsis.starts_with('(') || synopsis.starts_with(':') {
                continue;
            }
            let words: Vec<&str> = synopsis.split_whitespace().collect();
            for cut in 1..=words.len() {
                for bad in [
                    "x",
                    "-1",
                    "99999999999",
                    "b/",
                    "/s",
                    "0xzz",
                    "x%",
                    "1.2.3.4",
                ] {
                    let line: Vec<&str> = words[..cut]
                        .iter()
                        .map(|w| {
                            if w.contains('<') || w.contains('[') {
                                bad
                            } else {
                                w
                            }
                        })
                        .collect();
                    lines.push(line.join(" "));
                }
            }
        }
        assert!(
            lines.len() > 500,
            "help lists the commands: {}",
            lines.len()
        );
        for line in &lines {
            if let Err(e) = parse(line) {
                let e = e.to_string();
                assert!(is_error(&e), "{line}: {e}");
                assert!(!e.contains('\n'), "one line: {e:?}");
            }
        }
    }

    #[test]
    fn lines_split_at_unescaped_semicolons() {
        assert_eq!(
            split_line("show info; show stat ;; set server b/s state drain"),
            ["show info", "show stat", "set server b/s state drain"]
        );
        assert_eq!(split_line("a\\;b;c"), ["a;b", "c"]);
    }

    #[test]
    fn user_level_only_reads() {
        assert_eq!(parse("show stat").unwrap().level(), AdminLevel::User);
        assert_eq!(
            parse("clear table b").unwrap().level(),
            AdminLevel::Operator
        );
        assert_eq!(
            parse("disable server b/s").unwrap().level(),
            AdminLevel::Admin
        );
        assert_eq!(parse("reload").unwrap().level(), AdminLevel::Admin);
    }
}
