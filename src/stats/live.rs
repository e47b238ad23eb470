//! `show servers state`, `show table` and `show sessions`: printed straight from the running
//! state, in HAProxy's layouts where HAProxy has the command.

use std::fmt::Write;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;

use crate::Shared;
use crate::state::{Backend, Snapshot};

/// `show servers state`, in HAProxy's server-state file layout.
pub fn servers_state(snap: &Snapshot, only: Option<&str>) -> String {
    let mut out = String::from(
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n",
    );
    let nfe = snap.frontends.len();
    for (i, be) in snap.backends.iter().enumerate() {
        if only.is_some_and(|o| o != be.config.name) {
            continue;
        }
        for s in &be.servers {
            let cfg = s.config();
            let op = if s.health.is_up() { 2 } else { 0 };
            // HAProxy's srv_admin_state bits: who put it in MAINT or DRAIN.
            let admin = s.admin_flags().bits();
            let addr = s.addr();
            let _ = writeln!(
                out,
                "{} {} {} {} {} {op} {admin} {} {} {} {} {} {} {} 0 0 0 - {} - 0 {} - - 0",
                nfe + i + 1,
                be.config.name,
                s.sid.load(Relaxed),
                s.name,
                addr.ip(),
                s.weight(),
                cfg.weight,
                s.since_last_change().as_secs(),
                s.health.last().status.code(),
                u8::from(s.health.last().status.is_ok()) + 1,
                u8::from(s.health.is_up()),
                u8::from(s.health.enabled()) * 6,
                addr.port(),
                cfg.check.port.unwrap_or(0),
            );
        }
    }
    out
}

/// `show servers conn [<backend>]`, in HAProxy 2.6's layout. sclb keeps no idle server
/// connections (each client connection has its own), so the idle columns are 0 and one
/// per-thread idle count follows per data-plane thread, as HAProxy prints.
pub fn servers_conn(snap: &Snapshot, only: Option<&str>, threads: usize) -> String {
    let mut out = format!(
        "# bkname/svname bkid/svid addr port - purge_delay used_cur used_max need_est unsafe_nb safe_nb idle_lim idle_cur idle_per_thr[{threads}]\n"
    );
    let nfe = snap.frontends.len();
    for (i, be) in snap.backends.iter().enumerate() {
        if only.is_some_and(|o| o != be.config.name) {
            continue;
        }
        for s in &be.servers {
            let addr = s.addr();
            let _ = write!(
                out,
                "{}/{} {}/{} {} {} - 0 {} {} {} 0 0 0 0",
                be.config.name,
                s.name,
                nfe + i + 1,
                s.sid.load(Relaxed),
                addr.ip(),
                addr.port(),
                s.counters.cur.load(Relaxed),
                s.counters.max.load(Relaxed),
                s.counters.cur.load(Relaxed),
            );
            for _ in 0..threads {
                out.push_str(" 0");
            }
            out.push('\n');
        }
    }
    out
}

/// `show sessions`: the gateway's live Spark sessions, oldest first.
pub fn spark_sessions(shared: &Shared) -> String {
    let list = shared.gateway.registry.list();
    let mut out = format!("# sessions: {}\n", list.len());
    for s in &list {
        let p = s.placement();
        let _ = writeln!(
            out,
            "{}: user={} fe={} be={} srv={} src={} age={}s idle={}s rpcs={} streams={}",
            crate::escape::token(&s.key.session_id),
            if s.key.user_id.is_empty() {
                "-".into()
            } else {
                crate::escape::token(&s.key.user_id)
            },
            s.frontend,
            s.backend,
            p.server_name,
            s.client(),
            s.age().as_secs(),
            s.idle_for().as_secs(),
            s.rpcs.load(std::sync::atomic::Ordering::Relaxed),
            s.streams.load(std::sync::atomic::Ordering::Relaxed),
        );
        if let Some(app) = &s.meta.app {
            // Before the newline: the driver it runs on, when that is a Kubernetes object.
            out.pop();
            let _ = writeln!(
                out,
                " app={}/{}{}",
                crate::escape::token(s.meta.namespace.as_deref().unwrap_or("-")),
                crate::escape::token(app),
                if s.meta.created { " created" } else { "" }
            );
        }
    }
    out
}

/// `show table`: a summary line per table, or one table's entries (optionally one key).
pub fn table(snap: &Snapshot, name: Option<&str>, key: Option<IpAddr>) -> Result<String, String> {
    let mut out = String::new();
    let header = |out: &mut String, be: &Backend| {
        let t = be.stick.as_ref().expect("filtered");
        let _ = writeln!(
            out,
            "# table: {}, type: ip, size:{}, used:{}",
            be.config.name,
            t.size(),
            t.len()
        );
    };
    match name {
        None => {
            for be in snap.backends.iter().filter(|b| b.stick.is_some()) {
                header(&mut out, be);
            }
        }
        Some(n) => {
            let be = snap
                .backend(n)
                .filter(|b| b.stick.is_some())
                .ok_or("No such table")?;
            header(&mut out, be);
            let t = be.stick.as_ref().expect("filtered");
            for (i, e) in t.entries().iter().enumerate() {
                if key.is_some_and(|k| k != e.key) {
                    continue;
                }
                let server = be.server(e.server);
                let _ = writeln!(
                    out,
                    "0x{:x}: key={} use={} exp={} server_id={} server_key={}",
                    i + 1,
                    e.key,
                    server.map(|s| s.counters.cur.load(Relaxed)).unwrap_or(0),
                    e.expires_in.as_millis(),
                    server.map(|s| s.sid.load(Relaxed)).unwrap_or(0),
                    server
                        .map(|s| s.name.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
    }
    Ok(out)
}
