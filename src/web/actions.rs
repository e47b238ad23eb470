//! Admin actions from the stats page, as HAProxy's `stats admin`: `POST /stats` with HAProxy's
//! form fields (`b=<backend>&s=<server>&s=...&action=<action>`) and
//! `Authorization: Bearer <admin_token>`. Each ticked server becomes one admin [`Command`] run
//! through [`crate::admin::execute`], so it goes through `control::apply` and is in the state
//! file before the reply, as over the admin socket.
//!
//! Why this is CSRF-safe: a cross-site form post or image cannot set `Authorization`, and the
//! page keeps the token in the tab's `sessionStorage`, never in a cookie, so the browser never
//! attaches it on its own. Besides, a request whose `Origin` is not this listener or whose
//! `Sec-Fetch-Site` says it came from another site is refused before the token is looked at.

use std::fmt;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::info;

use crate::Shared;
use crate::admin::command::{Command, Target};
use crate::config::AdminLevel;
use crate::server::{AdminState, ForcedHealth};

/// Longest backend or server name taken from the form (config names have at most 64).
const MAX_NAME: usize = 128;
/// Most servers one action may name.
const MAX_SERVERS: usize = 1000;
/// Largest form body read.
pub const MAX_BODY: usize = 64 * 1024;

/// What the page's buttons do, by HAProxy's `action` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    State(AdminState),
    Health(ForcedHealth),
    /// `shutdown sessions server`.
    Shutdown,
}

impl Action {
    /// Every action, with HAProxy's form value and the button's words.
    pub const ALL: [(Action, &'static str, &'static str); 7] = [
        (Action::State(AdminState::Ready), "ready", "READY"),
        (Action::State(AdminState::Drain), "drain", "DRAIN"),
        (Action::State(AdminState::Maint), "maint", "MAINT"),
        (Action::Health(ForcedHealth::Up), "hrunn", "Health UP"),
        (
            Action::Health(ForcedHealth::Stopping),
            "hnolb",
            "Health STOPPING",
        ),
        (Action::Health(ForcedHealth::Down), "hdown", "Health DOWN"),
        (Action::Shutdown, "shutdown", "Kill sessions"),
    ];

    fn parse(v: &str) -> Option<Action> {
        Self::ALL.iter().find(|(_, k, _)| *k == v).map(|(a, ..)| *a)
    }

    fn command(self, target: Target) -> Command {
        match self {
            Action::State(state) => Command::SetState { target, state },
            Action::Health(health) => Command::SetHealth { target, health },
            Action::Shutdown => Command::ShutdownSessions(target),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words = Self::ALL
            .iter()
            .find(|(a, ..)| a == self)
            .map_or("?", |(.., w)| w);
        f.write_str(words)
    }
}

/// A validated action request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub backend: String,
    pub servers: Vec<String>,
    pub action: Action,
}

/// A value from the form, shortened and quoted for an error message.
fn shown(v: &str) -> String {
    let short: String = v.chars().take(40).collect();
    let more = if short.len() < v.len() { "..." } else { "" };
    format!("{:?}", format!("{short}{more}"))
}

fn name(field: &str, v: &str) -> Result<String, String> {
    if v.is_empty() || v.len() > MAX_NAME || v.chars().any(char::is_control) {
        return Err(format!(
            "field '{field}': {} is not a name (1-{MAX_NAME} printable characters)",
            shown(v)
        ));
    }
    Ok(v.to_string())
}

/// Reads the form: `b` once, `s` at least once, `action` once; anything else is refused.
/// Every error names its field.
pub fn parse(body: &[u8]) -> Result<Request, String> {
    let (mut backend, mut action, mut servers) = (None, None, Vec::new());
    for (k, v) in form_urlencoded::parse(body) {
        match &*k {
            "b" if backend.is_some() => return Err("field 'b' given twice".into()),
            "b" => backend = Some(name("b", &v)?),
            "s" if servers.len() == MAX_SERVERS => {
                return Err(format!("field 's': more than {MAX_SERVERS} servers"));
            }
            "s" => servers.push(name("s", &v)?),
            "action" if action.is_some() => return Err("field 'action' given twice".into()),
            "action" => {
                action = Some(Action::parse(&v).ok_or_else(|| {
                    let known: Vec<&str> = Action::ALL.iter().map(|(_, k, _)| *k).collect();
                    format!(
                        "field 'action': {} is not one of {}",
                        shown(&v),
                        known.join(", ")
                    )
                })?);
            }
            other => return Err(format!("unknown field {}", shown(other))),
        }
    }
    let backend = backend.ok_or("field 'b' (the backend) is missing")?;
    let action = action.ok_or("field 'action' is missing")?;
    if servers.is_empty() {
        return Err("field 's': no server ticked".into());
    }
    Ok(Request {
        backend,
        servers,
        action,
    })
}

/// The refusal of a request that a page of another site sent (CSRF), if this is one: its
/// `Origin` is not this listener's `Host`, or `Sec-Fetch-Site` says cross-site. Clients that
/// send neither (curl, scripts) pass on to the token check.
pub fn cross_site(headers: &HeaderMap) -> Option<String> {
    let get = |h| headers.get(h).map(|v| v.to_str().unwrap_or("?"));
    if let Some(site) = get(header::HeaderName::from_static("sec-fetch-site"))
        && !matches!(site, "same-origin" | "none")
    {
        return Some(format!("Sec-Fetch-Site is {}", shown(site)));
    }
    if let Some(origin) = get(header::ORIGIN) {
        let host = get(header::HOST).unwrap_or("");
        let same = ["http://", "https://"]
            .iter()
            .any(|p| origin.strip_prefix(p) == Some(host));
        if !same || host.is_empty() {
            return Some(format!(
                "Origin {} is not this listener ({})",
                shown(origin),
                shown(host)
            ));
        }
    }
    None
}

/// Runs a validated request: every server is checked to be in the backend first (nothing
/// changes if one is not), then the action is applied to each in turn. 200 when every server
/// took it; 400 with a line per server otherwise.
pub async fn run(shared: &Arc<Shared>, req: Request) -> Response {
    let snap = shared.state.snapshot();
    let Some(be) = snap.backend(&req.backend) else {
        return bad(format!("field 'b': no backend {}", shown(&req.backend)));
    };
    if let Some(s) = req.servers.iter().find(|s| be.server_by_name(s).is_none()) {
        return bad(format!(
            "field 's': no server {} in backend {}",
            shown(s),
            req.backend
        ));
    }
    drop(snap);
    info!(action = %req.action, backend = %req.backend, servers = ?req.servers, "stats page action");
    let (mut text, mut failed) = (String::new(), false);
    for server in &req.servers {
        let target = Target {
            backend: Some(req.backend.clone()),
            server: server.clone(),
        };
        let cmd = req.action.command(target);
        match crate::admin::execute(shared, cmd, AdminLevel::Admin).await {
            Ok(_) => text.push_str(&format!("{}/{server}: {} done\n", req.backend, req.action)),
            Err(e) => {
                failed = true;
                text.push_str(&format!("{}/{server}: {e}\n", req.backend));
            }
        }
    }
    let status = if failed {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (status, text).into_response()
}

fn bad(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxys_form_fields() {
        let r = parse(b"b=be&s=sc1&s=sc%3A2&action=drain").unwrap();
        assert_eq!(
            r,
            Request {
                backend: "be".into(),
                servers: vec!["sc1".into(), "sc:2".into()],
                action: Action::State(AdminState::Drain),
            }
        );
        assert_eq!(
            parse(b"action=hnolb&s=x&b=y").unwrap().action,
            Action::Health(ForcedHealth::Stopping)
        );
    }

    #[test]
    fn bad_forms_name_the_field() {
        for (body, err) in [
            ("b=be&s=s1", "field 'action' is missing"),
            ("s=s1&action=ready", "field 'b' (the backend) is missing"),
            ("b=be&action=ready", "field 's': no server ticked"),
            (
                "b=be&s=s1&action=nuke",
                "field 'action': \"nuke\" is not one of ready, drain",
            ),
            ("b=be&b=bf&s=s1&action=ready", "field 'b' given twice"),
            ("b=be&s=&action=ready", "field 's': \"\" is not a name"),
            (
                "b=be&s=a%0Ab&action=ready",
                "field 's': \"a\\nb\" is not a name",
            ),
            ("b=be&s=s1&action=ready&x=1", "unknown field \"x\""),
        ] {
            let e = parse(body.as_bytes()).unwrap_err();
            assert!(e.starts_with(err), "{body}: {e}");
        }
        let long = format!("b=be&action=ready&s={}", "x".repeat(MAX_NAME + 1));
        let e = parse(long.as_bytes()).unwrap_err();
        assert!(e.contains("xxx...\" is not a name (1-128"), "{e}");
        let many = format!("b=be&action=ready{}", "&s=x".repeat(MAX_SERVERS + 1));
        assert_eq!(
            parse(many.as_bytes()).unwrap_err(),
            format!("field 's': more than {MAX_SERVERS} servers")
        );
    }

    #[test]
    fn requests_from_other_sites_are_refused() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            m
        };
        assert_eq!(cross_site(&h(&[("host", "lb:9000")])), None, "curl");
        let page = [
            ("host", "lb:9000"),
            ("origin", "http://lb:9000"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(cross_site(&h(&page)), None, "the stats page itself");
        for bad in [
            h(&[("host", "lb:9000"), ("origin", "http://evil.example")]),
            h(&[("host", "lb:9000"), ("origin", "null")]),
            h(&[("host", "lb:9000"), ("sec-fetch-site", "cross-site")]),
            h(&[("host", "lb:9000"), ("sec-fetch-site", "same-site")]),
            h(&[("origin", "http://lb:9000")]),
        ] {
            assert!(cross_site(&bad).is_some(), "{bad:?}");
        }
    }
}
