//! Parsing admin command lines (HAProxy's runtime API) into [`Command`]s.
//!
//! Error texts follow HAProxy's where HAProxy has one ("No such server.", "Require
//! 'backend/server'.", "Permission denied"), so operators' scripts that grep for them keep
//! working. Every error starts with one of [`ERROR_PREFIXES`], which is how `sclb ctl` tells an
//! error reply from a normal one.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::{AdminLevel, MAX_WEIGHT};
use crate::server::AdminState;

/// `backend/server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub backend: String,
    pub server: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.backend, self.server)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatFormat {
    Csv,
    Typed,
    Json,
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
    ShowInfo,
    ShowStat(StatFormat),
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
    /// Gateway: live Spark sessions.
    ShowSessions,
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
            | Command::ShowInfo
            | Command::ShowStat(_)
            | Command::ShowServersState(_)
            | Command::ShowTable { .. }
            | Command::ShowSess
            | Command::ShowSessions
            | Command::WaitRemovable { .. } => AdminLevel::User,
            Command::ClearTable { .. } | Command::KillSession(_) => AdminLevel::Operator,
            _ => AdminLevel::Admin,
        }
    }
}

/// The first words of every error reply.
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
  show stat [typed|json]                  : report counters for each proxy and server (HAProxy CSV)
  show servers state [<backend>]          : dump volatile server information
  show table [<table>] [key <ip>]         : report table usage or dump a table's entries
  show sess                               : list live client connections
  show sessions                           : list live Spark sessions (gateway frontends)
  kill session <session_id>               : end a Spark session and close its streams
  clear table <table> [key <ip>]          : remove all pins of a table, or one
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

fn target(word: Option<&&str>) -> Result<Target, String> {
    let w = word.ok_or("Require 'backend/server'.")?;
    match w.split_once('/') {
        Some((b, s)) if !b.is_empty() && !s.is_empty() => Ok(Target {
            backend: b.to_string(),
            server: s.to_string(),
        }),
        _ => Err("Require 'backend/server'.".into()),
    }
}

fn weight(word: Option<&&str>) -> Result<Weight, String> {
    let w = word.ok_or("Require <weight> or <weight%>.")?;
    if let Some(p) = w.strip_suffix('%') {
        return match p.parse::<u32>() {
            Ok(n) => Ok(Weight::Percent(n)),
            Err(_) => Err("Relative weight must be a positive integer percentage.".into()),
        };
    }
    match w.parse::<u32>() {
        Ok(n) if n <= MAX_WEIGHT => Ok(Weight::Absolute(n)),
        _ => Err(format!(
            "Absolute weight can only be between 0 and {MAX_WEIGHT} inclusive."
        )),
    }
}

fn key(words: &[&str]) -> Result<Option<IpAddr>, String> {
    match words {
        [] => Ok(None),
        ["key", ip] => ip
            .parse()
            .map(Some)
            .map_err(|_| format!("Invalid key '{ip}': expected an IPv4 or IPv6 address.")),
        _ => Err("Invalid table filter: expected 'key <ip>'.".into()),
    }
}

/// Parses one command (no `;`).
pub fn parse(cmd: &str) -> Result<Command, String> {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    let c = match w.as_slice() {
        ["help", ..] => Command::Help,
        ["prompt"] => Command::Prompt,
        ["quit"] => Command::Quit,
        ["show", "info", ..] => Command::ShowInfo,
        ["show", "stat"] => Command::ShowStat(StatFormat::Csv),
        ["show", "stat", "typed"] => Command::ShowStat(StatFormat::Typed),
        ["show", "stat", "json"] => Command::ShowStat(StatFormat::Json),
        ["show", "stat", ..] => {
            return Err(
                "Invalid 'show stat' argument: expected nothing, 'typed' or 'json'.".into(),
            );
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
            return Err("Missing table name: 'clear table <table> [key <ip>]'.".into());
        }
        ["show", "sessions"] => Command::ShowSessions,
        ["show", "sess", ..] => Command::ShowSess,
        ["kill", "session", id] => Command::KillSession(id.to_string()),
        ["kill", "session", ..] => {
            return Err("Require 'session_id': 'kill session <session_id>'.".into());
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
                    return Err(
                        "'set server <srv> state' expects 'ready', 'drain' and 'maint'.".into(),
                    );
                }
            },
        },
        ["set", "server", _, "state"] => {
            return Err("'set server <srv> state' expects 'ready', 'drain' and 'maint'.".into());
        }
        ["set", "server", t, "weight", rest @ ..] | ["set", "weight", t, rest @ ..] => {
            Command::SetWeight {
                target: target(Some(t))?,
                weight: weight(rest.first())?,
            }
        }
        ["set", "server", t, "addr", ip, rest @ ..] => Command::SetAddr {
            target: target(Some(t))?,
            ip: ip
                .parse()
                .map_err(|_| format!("Invalid addr '{ip}': expected an IP address."))?,
            port: match rest {
                [] => None,
                ["port", p] => Some(p.parse().map_err(|_| format!("Invalid port '{p}'."))?),
                _ => {
                    return Err(
                        "Invalid arguments: 'set server <bk>/<srv> addr <ip> [port <p>]'.".into(),
                    );
                }
            },
        },
        ["set", "server", _, ..] => {
            return Err("'set server <srv>' only supports 'state', 'weight' and 'addr'.".into());
        }
        ["set", "maxconn", "server", t, n] => Command::SetMaxconn {
            target: target(Some(t))?,
            maxconn: n
                .parse()
                .map_err(|_| format!("Invalid maxconn '{n}': expected an integer."))?,
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
        ["reload"] => Command::Reload,
        ["wait", t, "srv-removable", srv] => Command::WaitRemovable {
            timeout: crate::config::reader::parse_duration(t)
                .map_err(|e| format!("Invalid wait timeout: {e}"))?,
            target: target(Some(srv))?,
        },
        ["wait", ..] => {
            return Err("Invalid arguments: 'wait <timeout> srv-removable <bk>/<srv>'.".into());
        }
        _ => {
            return Err(format!(
                "Unknown command '{}'. Type 'help' for the list of commands.",
                cmd.chars().take(80).collect::<String>()
            ));
        }
    };
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(b: &str, s: &str) -> Target {
        Target {
            backend: b.into(),
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
            ("disable server b", "Require 'backend/server'."),
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
            let e = parse(line).unwrap_err();
            assert!(e.starts_with(want), "{line}: {e}");
            assert!(is_error(&e), "{line}: {e} has no known error prefix");
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
