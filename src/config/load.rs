//! Reading a config file into the typed model of [`super`]: every key, every default, every
//! cross-reference, each error with file, line and field.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;

use super::reader::{self, Diag, Table, join};
use super::security;
use super::*;

const GLOBAL_KEYS: &[&str] = &[
    "maxconn",
    "log",
    "hard_stop_after",
    "admin",
    "stats",
    "state_file",
    "splice",
    "user",
    "group",
    "threads",
    "store",
];
const TIMEOUT_KEYS: &[&str] = &[
    "connect",
    "client",
    "server",
    "tunnel",
    "queue",
    "http_request",
];
const CHECK_KEYS: &[&str] = &[
    "type",
    "inter",
    "fastinter",
    "downinter",
    "rise",
    "fall",
    "timeout",
    "port",
    "spread",
    "init_state",
];

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let src = crate::files::read_text(path, crate::files::MAX_CONFIG).map_err(|source| {
        LoadError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    parse(path, &src).map_err(LoadError::Invalid)
}

/// Parses and validates config text; `path` is used for error messages and stored in the result.
pub fn parse(path: &Path, src: &str) -> Result<Config, Vec<ConfigError>> {
    let diag = Diag::new(path, src);
    let (doc, syntax) = DeTable::parse_recoverable(src);
    for e in &syntax {
        let at = e.span().map(|s| s.start).unwrap_or(0);
        diag.error(at, "", format!("TOML syntax: {}", e.message()));
    }
    if !syntax.is_empty() {
        return Err(diag.into_errors());
    }
    let root = Table::root(&doc, &diag);
    let config = read_config(path, root);
    if diag.has_errors() {
        return Err(diag.into_errors());
    }
    Ok(config.expect("a config read without errors is complete"))
}

fn read_config(path: &Path, root: Table<'_, '_>) -> Option<Config> {
    root.allow(&["global", "defaults", "frontend", "backend"]);
    let global = match root.table("global", "global") {
        Some(t) => read_global(t),
        None => Some(default_global()),
    };
    let defaults = root
        .table("defaults", "defaults")
        .map(read_defaults)
        .unwrap_or_default();

    let fe_paths = root.element_paths("frontend");
    let frontends: Vec<Option<Frontend>> = root
        .tables("frontend", &fe_paths)
        .into_iter()
        .map(|t| read_frontend(t, &defaults))
        .collect();
    let be_paths = root.element_paths("backend");
    let be_tables = root.tables("backend", &be_paths);
    let backends: Vec<Option<Backend>> = be_tables
        .iter()
        .map(|t| read_backend(*t, &defaults))
        .collect();
    if fe_paths.is_empty() {
        root.error(
            "frontend",
            "no [[frontend]]: sclb needs at least one listener",
        );
    }

    // Cross-references and uniqueness, from the raw tables: a table with another error in it
    // still gets these checked, so that one run reports everything.
    let fe_tables = root.tables("frontend", &fe_paths);
    let be_names: Vec<&str> = be_tables.iter().filter_map(|t| t.str("name")).collect();
    unique_names(&fe_tables, "frontend");
    unique_names(&be_tables, "backend");
    for t in &fe_tables {
        if let Some(be) = t.str("backend")
            && !be_names.contains(&be)
        {
            t.error("backend", format!("backend \"{be}\" is not defined"));
        }
    }
    for (fe, t) in frontends.iter().zip(&fe_tables) {
        let Some(fe) = fe else { continue };
        if fe.grpc.as_ref().is_some_and(|g| g.on_demand.is_some()) {
            let kind = backends
                .iter()
                .flatten()
                .find(|b| b.name == fe.backend)
                .and_then(|b| b.discovery.as_ref())
                .map(|d| d.kind);
            if !matches!(
                kind,
                Some(KubernetesKind::SparkConnects | KubernetesKind::SparkApplications)
            ) {
                t.error(
                    "on_demand",
                    format!(
                        "backend \"{}\" must discover sparkconnects or sparkapplications ([backend.discovery.kubernetes] kind) for on-demand drivers to join it",
                        fe.backend
                    ),
                );
            }
        }
    }
    for (fe, t) in frontends.iter().zip(&fe_tables) {
        if let Some(fe) = fe {
            pool_is_watched(fe, &backends, *t);
        }
    }
    let pg_store = global
        .as_ref()
        .is_some_and(|g| matches!(g.store, StoreConfig::Postgres(_)));
    for (b, t) in backends.iter().zip(&be_tables) {
        if let Some(b) = b
            && b.stick.as_ref().is_some_and(|s| s.shared)
            && !pg_store
        {
            t.error(
                "stick",
                "store = \"shared\" needs [global] store = { kind = \"postgres\", ... } to share pins through",
            );
        }
    }
    let mut binds = HashSet::new();
    for fe in frontends.iter().flatten() {
        for b in &fe.binds {
            if !binds.insert(*b) && b.port() != 0 {
                let t = fe_tables.iter().find(|t| t.str("name") == Some(&fe.name));
                if let Some(t) = t {
                    t.error("bind", format!("address {b} is bound twice"));
                }
            }
        }
    }

    Some(Config {
        source: path.to_path_buf(),
        global: global?,
        frontends: frontends.into_iter().collect::<Option<Vec<_>>>()?,
        backends: backends.into_iter().collect::<Option<Vec<_>>>()?,
    })
}

fn default_global() -> Global {
    Global {
        maxconn: 20000,
        log: LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        },
        hard_stop_after: Duration::from_secs(30),
        admin: None,
        stats: None,
        state_file: None,
        splice: true,
        run_as: None,
        threads: 0,
        store: StoreConfig::Memory,
    }
}

/// A user name (or numeric id) from the system's user database.
fn lookup_user(t: Table<'_, '_>, key: &str) -> Option<nix::unistd::User> {
    let name = t.str(key)?;
    let found = match name.parse::<u32>() {
        Ok(id) => nix::unistd::User::from_uid(id.into()),
        Err(_) => nix::unistd::User::from_name(name),
    };
    match found {
        Ok(Some(u)) => Some(u),
        _ => {
            t.error(key, format!("no such user \"{name}\" on this machine"));
            None
        }
    }
}

fn lookup_group(t: Table<'_, '_>, key: &str) -> Option<u32> {
    let name = t.str(key)?;
    let found = match name.parse::<u32>() {
        Ok(id) => nix::unistd::Group::from_gid(id.into()),
        Err(_) => nix::unistd::Group::from_name(name),
    };
    match found {
        Ok(Some(g)) => Some(g.gid.as_raw()),
        _ => {
            t.error(key, format!("no such group \"{name}\" on this machine"));
            None
        }
    }
}

/// Longest admin socket path: a Unix socket address holds 107 bytes, and sclb binds under a
/// temporary name (`<path>.<pid>.tmp`) before renaming it into place.
const MAX_SOCKET_PATH: usize = 107 - ".4194304.tmp".len();

/// Refuses a path that `bind(2)` would refuse, before the process depends on it.
fn unix_socket_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.contains('\0') {
        return Err("must be a non-empty path without NUL bytes".into());
    }
    if p.len() > MAX_SOCKET_PATH {
        return Err(format!(
            "\"{}\" is {} bytes; a Unix socket path can have at most {MAX_SOCKET_PATH} here \
             (the kernel's limit, less the temporary name sclb binds first)",
            reader::bounded(p),
            p.len()
        ));
    }
    if p.ends_with('/') {
        return Err(format!("\"{}\" names a directory", reader::bounded(p)));
    }
    Ok(())
}

/// The directory a file sclb creates goes in must exist when it starts: else every save (or
/// the bind) fails while the process runs. Not checked by `sclb check`: systemd creates
/// `RuntimeDirectory`/`StateDirectory` only when the service starts.
pub fn parent_dir(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a directory",
            reader::bounded(&dir.display().to_string())
        )),
        Err(e) => Err(format!(
            "directory {}: {e}",
            reader::bounded(&dir.display().to_string())
        )),
    }
}

/// Whether an admin `path` is really a network address: the runtime API has no
/// authentication of its own, so sclb only serves it on a Unix socket.
fn looks_like_tcp(path: &str) -> bool {
    path.parse::<SocketAddr>().is_ok()
        || ["tcp:", "tcp4:", "tcp6:", "ipv4@", "ipv6@", "tcp@"]
            .iter()
            .any(|p| path.starts_with(p))
        || path
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.contains('/') && p.parse::<u16>().is_ok())
}

fn read_global(t: Table<'_, '_>) -> Option<Global> {
    t.allow(GLOBAL_KEYS);
    let mut g = default_global();
    let mut ok = true;
    if let Some(n) = t.int("maxconn", 1, 1_000_000) {
        g.maxconn = n as usize;
    }
    if let Some(d) = t.duration("hard_stop_after") {
        g.hard_stop_after = d;
    }
    if let Some(log) = t.table("log", "global.log") {
        log.allow(&["level", "format"]);
        if let Some(level) = log.choice(
            "level",
            &[
                ("error", "error"),
                ("warn", "warn"),
                ("info", "info"),
                ("debug", "debug"),
                ("trace", "trace"),
            ],
        ) {
            g.log.level = level.to_string();
        }
        if let Some(f) = log.choice(
            "format",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        ) {
            g.log.format = f;
        }
    }
    if let Some(a) = t.table("admin", "global.admin") {
        a.allow(&["path", "mode", "level", "user", "group"]);
        let mut path = if a.required("path") {
            a.str("path")
        } else {
            None
        };
        if let Some(p) = path
            && looks_like_tcp(p)
        {
            a.error(
                "path",
                format!(
                    "\"{p}\" is a network address: the admin socket has no authentication, so \
                     sclb only serves it on a Unix socket path such as \"/run/sclb/admin.sock\" \
                     (for remote admin use stats.admin_token)"
                ),
            );
            path = None;
        }
        if let Some(p) = path
            && let Err(e) = unix_socket_path(p)
        {
            a.error("path", e);
            path = None;
        }
        let uid = a.contains("user").then(|| lookup_user(a, "user")).flatten();
        let gid = a
            .contains("group")
            .then(|| lookup_group(a, "group"))
            .flatten();
        if (a.contains("user") && uid.is_none()) || (a.contains("group") && gid.is_none()) {
            ok = false;
        }
        let mode = match a.str("mode") {
            None => Some(0o600),
            Some(m) => match u32::from_str_radix(m, 8) {
                Ok(v) if v <= 0o777 => Some(v),
                _ => {
                    a.error(
                        "mode",
                        format!("\"{m}\" is not an octal file mode such as \"0600\""),
                    );
                    None
                }
            },
        };
        let level = if a.contains("level") {
            a.choice(
                "level",
                &[
                    ("user", AdminLevel::User),
                    ("operator", AdminLevel::Operator),
                    ("admin", AdminLevel::Admin),
                ],
            )
        } else {
            Some(AdminLevel::Admin)
        };
        match (path, mode, level) {
            (Some(path), Some(mode), Some(level)) => {
                g.admin = Some(AdminConfig {
                    path: path.into(),
                    mode,
                    level,
                    uid: uid.map(|u| u.uid.as_raw()),
                    gid,
                })
            }
            _ => ok = false,
        }
    }
    if let Some(s) = t.table("stats", "global.stats") {
        s.allow(&[
            "bind",
            "admin_token",
            "refresh",
            "maxconn",
            "timeout",
            "metric_names",
        ]);
        let bind = if s.required("bind") {
            s.parse::<SocketAddr>("bind", "address")
        } else {
            None
        };
        let admin_token = s.str("admin_token").map(str::to_string);
        if admin_token.as_deref().is_some_and(|tok| tok.len() < 16) {
            s.error("admin_token", "too short: use at least 16 characters");
        }
        let refresh = s.duration("refresh").unwrap_or(Duration::from_secs(5));
        let maxconn = s.int("maxconn", 1, 10_000).map_or(100, |n| n as usize);
        let timeout = positive(s, "timeout").unwrap_or(Duration::from_secs(10));
        let metric_names = match s.str("metric_names") {
            None | Some("sclb") => MetricNames::Sclb,
            Some("haproxy") => MetricNames::Haproxy,
            Some(_) => {
                s.error("metric_names", "expected \"sclb\" or \"haproxy\"");
                MetricNames::Sclb
            }
        };
        match bind {
            Some(bind) => {
                g.stats = Some(StatsConfig {
                    bind,
                    admin_token,
                    refresh,
                    maxconn,
                    timeout,
                    metric_names,
                })
            }
            None => ok = false,
        }
    }
    if let Some(p) = t.str("state_file") {
        if let Err(e) = check_state_file(Path::new(p)) {
            t.error("state_file", e);
        }
        g.state_file = Some(p.into());
    }
    if let Some(b) = t.bool("splice") {
        g.splice = b;
    }
    if let Some(st) = t.table("store", "global.store") {
        match read_store(st) {
            Some(s) => g.store = s,
            None => ok = false,
        }
    }
    if let Some(n) = t.int("threads", 0, 256) {
        g.threads = n as usize;
    }
    if t.contains("user") || t.contains("group") {
        let user = lookup_user(t, "user");
        let gid = if t.contains("group") {
            lookup_group(t, "group")
        } else {
            user.as_ref().map(|u| u.gid.as_raw())
        };
        if !t.contains("user") {
            t.error(
                "user",
                "\"group\" needs \"user\" too: sclb drops to a user and its group",
            );
        }
        match (user, gid) {
            (Some(u), Some(gid)) => {
                g.run_as = Some(RunAs {
                    user: u.name,
                    uid: u.uid.as_raw(),
                    gid,
                })
            }
            _ => ok = false,
        }
    }
    ok.then_some(g)
}

/// `[global] store = { kind = "memory" }`, `{ kind = "postgres", url = "...", ... }` or
/// `{ kind = "kubernetes", namespace = "...", ... }`.
fn read_store(t: Table<'_, '_>) -> Option<StoreConfig> {
    const PG: &[&str] = &["url", "password_file", "ca", "timeout"];
    const KUBE: &[&str] = &[
        "namespace",
        "lease",
        "lease_duration",
        "kubeconfig",
        "activity_interval",
        "orphan_grace",
    ];
    let mut allowed = vec!["kind", "sync_interval"];
    allowed.extend_from_slice(PG);
    allowed.extend_from_slice(KUBE);
    t.allow(&allowed);
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Memory,
        Postgres,
        Kubernetes,
    }
    let kind = t.choice(
        "kind",
        &[
            ("memory", Kind::Memory),
            ("postgres", Kind::Postgres),
            ("kubernetes", Kind::Kubernetes),
        ],
    )?;
    let only = |keys: &[&str], which: &str| {
        for k in keys {
            if t.contains(k) {
                t.error(k, format!("only a {which} store takes it"));
            }
        }
    };
    match kind {
        Kind::Memory => {
            only(PG, "postgres");
            only(KUBE, "kubernetes");
            if t.contains("sync_interval") {
                t.error(
                    "sync_interval",
                    "only a postgres or kubernetes store takes it",
                );
            }
            Some(StoreConfig::Memory)
        }
        Kind::Postgres => {
            only(KUBE, "kubernetes");
            read_postgres_store(t)
        }
        Kind::Kubernetes => {
            only(PG, "postgres");
            read_kubernetes_store(t)
        }
    }
}

fn read_postgres_store(t: Table<'_, '_>) -> Option<StoreConfig> {
    let Some(url) = t.str("url") else {
        t.error(
            "url",
            "a postgres store needs url (\"postgres://sclb@db.example:5432/sclb\" or \"host=... user=... dbname=...\")",
        );
        return None;
    };
    // The value is not quoted back: a connection string may carry a password.
    if let Err(e) = url.parse::<tokio_postgres::Config>() {
        t.error("url", format!("not a PostgreSQL connection string: {e}"));
        return None;
    }
    let password_file = t.str("password_file").map(PathBuf::from);
    let ca = t.str("ca").map(PathBuf::from);
    if let Some(ca) = &ca
        && let Err(e) = crate::tls::client::store_config(Some(ca))
    {
        t.error("ca", e.to_string());
        return None;
    }
    let timeout = positive(t, "timeout").unwrap_or(Duration::from_secs(2));
    let sync_interval = positive(t, "sync_interval").unwrap_or(Duration::from_secs(2));
    Some(StoreConfig::Postgres(PostgresStore {
        url: url.to_string(),
        password_file,
        ca,
        timeout,
        sync_interval,
    }))
}

/// `{ kind = "kubernetes", namespace = "spark", lease = "sclb-reaper", ... }`.
fn read_kubernetes_store(t: Table<'_, '_>) -> Option<StoreConfig> {
    let mut ok = true;
    let mut name = |key: &str, what: &str| match t.str(key) {
        Some(v) if is_dns_label(v) => Some(v.to_string()),
        Some(v) => {
            t.error(
                key,
                format!(
                    "\"{}\" is not a {what} name (a-z, 0-9, '-', at most 63)",
                    crate::escape::token(v)
                ),
            );
            ok = false;
            None
        }
        None => None,
    };
    let namespace = name("namespace", "namespace");
    let lease = name("lease", "Lease").unwrap_or_else(|| "sclb-reaper".to_string());
    if namespace.is_none() && !t.contains("namespace") {
        t.error(
            "namespace",
            "a kubernetes store needs namespace (where its session Leases and the reaper's Lease live)",
        );
        ok = false;
    }
    let namespace = namespace.unwrap_or_default();
    let lease_duration = positive(t, "lease_duration").unwrap_or(Duration::from_secs(15));
    if lease_duration < Duration::from_secs(1) {
        t.error(
            "lease_duration",
            "must be at least 1s (the API server keeps it in whole seconds)",
        );
        ok = false;
    }
    let activity_interval = positive(t, "activity_interval").unwrap_or(Duration::from_secs(60));
    let orphan_grace = positive(t, "orphan_grace").unwrap_or(Duration::from_secs(600));
    let sync_interval = positive(t, "sync_interval").unwrap_or(Duration::from_secs(2));
    let kubeconfig = t.str("kubeconfig").map(PathBuf::from);
    ok.then_some(StoreConfig::Kubernetes(KubernetesStore {
        namespace,
        lease,
        lease_duration,
        kubeconfig,
        activity_interval,
        orphan_grace,
        sync_interval,
    }))
}

/// Settings from `[defaults]`; each may be overridden where it applies.
#[derive(Default)]
struct Defaults {
    timeouts: TimeoutsPartial,
    retries: Option<u32>,
    redispatch: Option<bool>,
    check: CheckPartial,
    balance: Option<Balance>,
    maxconn: Option<usize>,
}

#[derive(Default, Clone)]
struct TimeoutsPartial {
    connect: Option<Duration>,
    client: Option<Duration>,
    server: Option<Duration>,
    tunnel: Option<Duration>,
    queue: Option<Duration>,
    http_request: Option<Duration>,
}

impl TimeoutsPartial {
    fn read(t: Table<'_, '_>, allowed: &[&str]) -> Self {
        t.allow(allowed);
        TimeoutsPartial {
            connect: t.duration("connect"),
            client: t.duration("client"),
            server: t.duration("server"),
            tunnel: t.duration("tunnel"),
            queue: t.duration("queue"),
            http_request: positive(t, "http_request"),
        }
    }

    fn or(&self, base: &TimeoutsPartial) -> TimeoutsPartial {
        TimeoutsPartial {
            connect: self.connect.or(base.connect),
            client: self.client.or(base.client),
            server: self.server.or(base.server),
            tunnel: self.tunnel.or(base.tunnel),
            queue: self.queue.or(base.queue),
            http_request: self.http_request.or(base.http_request),
        }
    }
}

/// Shipped defaults when a timeout is set nowhere. Spark Connect keeps one HTTP/2 connection
/// per session open for hours, so the idle timeouts default to 4 h rather than HAProxy's
/// "no limit" or a web server's seconds.
const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
const DEFAULT_IDLE: Duration = Duration::from_secs(4 * 3600);
const DEFAULT_QUEUE: Duration = Duration::from_secs(30);
/// A gateway client's first request, and an RPC's first message: HAProxy's usual
/// `timeout http-request`. Spark clients send both at once.
const DEFAULT_HTTP_REQUEST: Duration = Duration::from_secs(10);

#[derive(Default, Clone)]
struct CheckPartial {
    kind: Option<CheckType>,
    inter: Option<Duration>,
    fastinter: Option<Duration>,
    downinter: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    timeout: Option<Duration>,
    port: Option<u16>,
    spread: Option<f64>,
    init_state: Option<InitState>,
}

impl CheckPartial {
    fn read(t: Table<'_, '_>) -> Self {
        t.allow(CHECK_KEYS);
        let spread = t.str("spread").and_then(|s| {
            let v = s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
                .filter(|p| (0.0..=50.0).contains(p));
            if v.is_none() {
                t.error(
                    "spread",
                    format!("\"{s}\" is not a percentage between \"0%\" and \"50%\""),
                );
            }
            v.map(|p| p / 100.0)
        });
        CheckPartial {
            kind: t.choice(
                "type",
                &[
                    ("tcp", CheckType::Tcp),
                    ("h2", CheckType::H2),
                    ("spark", CheckType::Spark),
                    ("none", CheckType::None),
                ],
            ),
            inter: positive(t, "inter"),
            fastinter: positive(t, "fastinter"),
            downinter: positive(t, "downinter"),
            rise: t.int("rise", 1, 100).map(|n| n as u32),
            fall: t.int("fall", 1, 100).map(|n| n as u32),
            timeout: positive(t, "timeout"),
            port: t.int("port", 1, 65535).map(|n| n as u16),
            spread,
            init_state: t.choice(
                "init_state",
                &[
                    ("fully-up", InitState::FullyUp),
                    ("up", InitState::Up),
                    ("down", InitState::Down),
                    ("fully-down", InitState::FullyDown),
                ],
            ),
        }
    }

    fn or(&self, base: &CheckPartial) -> CheckPartial {
        CheckPartial {
            kind: self.kind.or(base.kind),
            inter: self.inter.or(base.inter),
            fastinter: self.fastinter.or(base.fastinter),
            downinter: self.downinter.or(base.downinter),
            rise: self.rise.or(base.rise),
            fall: self.fall.or(base.fall),
            timeout: self.timeout.or(base.timeout),
            port: self.port.or(base.port),
            spread: self.spread.or(base.spread),
            init_state: self.init_state.or(base.init_state),
        }
    }

    /// Fills what is unset: fastinter and downinter follow inter, as in HAProxy.
    fn resolve(&self) -> CheckConfig {
        let d = CheckConfig::default();
        let inter = self.inter.unwrap_or(d.inter);
        CheckConfig {
            kind: self.kind.unwrap_or(d.kind),
            inter,
            fastinter: self.fastinter.unwrap_or(inter),
            downinter: self.downinter.unwrap_or(inter),
            rise: self.rise.unwrap_or(d.rise),
            fall: self.fall.unwrap_or(d.fall),
            timeout: self.timeout.unwrap_or(d.timeout.min(inter)),
            port: self.port,
            spread: self.spread.unwrap_or(d.spread),
            init_state: self.init_state.unwrap_or(d.init_state),
            token: None,
            tls: None,
        }
    }
}

fn positive(t: Table<'_, '_>, key: &str) -> Option<Duration> {
    let d = t.duration(key)?;
    if d.is_zero() {
        t.error(key, "must be longer than zero");
        return None;
    }
    Some(d)
}

const BALANCES: &[(&str, Balance)] = &[
    ("roundrobin", Balance::RoundRobin),
    ("leastconn", Balance::LeastConn),
    ("source", Balance::Source),
];

fn read_defaults(t: Table<'_, '_>) -> Defaults {
    t.allow(&[
        "timeout",
        "retries",
        "redispatch",
        "check",
        "balance",
        "maxconn",
    ]);
    Defaults {
        timeouts: t
            .table("timeout", "defaults.timeout")
            .map(|t| TimeoutsPartial::read(t, TIMEOUT_KEYS))
            .unwrap_or_default(),
        retries: t.int("retries", 0, 100).map(|n| n as u32),
        redispatch: t.bool("redispatch"),
        check: t
            .table("check", "defaults.check")
            .map(CheckPartial::read)
            .unwrap_or_default(),
        balance: t.choice("balance", BALANCES),
        maxconn: t.int("maxconn", 1, 1_000_000).map(|n| n as usize),
    }
}

/// Reports the second and later tables of `tables` that reuse a name.
fn unique_names(tables: &[Table<'_, '_>], what: &str) {
    let mut seen = HashSet::new();
    for t in tables {
        if let Some(name) = t.str("name")
            && !seen.insert(name)
        {
            t.error("name", format!("duplicate {what} name \"{name}\""));
        }
    }
}

/// Proxy and server names end up in admin commands (`backend/server`), CSV and HTML: keep them
/// to HAProxy's character set.
fn check_name(t: Table<'_, '_>) -> Option<String> {
    if !t.required("name") {
        return None;
    }
    let name = t.str("name")?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if !ok {
        t.error(
            "name",
            format!("\"{name}\" is not a valid name: use 1-64 of A-Z a-z 0-9 _ - . :"),
        );
        return None;
    }
    Some(name.to_string())
}

fn read_frontend(t: Table<'_, '_>, d: &Defaults) -> Option<Frontend> {
    t.allow(&[
        "name",
        "bind",
        "backend",
        "maxconn",
        "timeout",
        "backlog",
        "mode",
        "sessions",
        "route",
        "on_demand",
        "tls",
        "auth",
        "accept_proxy",
        "allow",
        "deny",
    ]);
    let name = check_name(t);
    let mut binds = Vec::new();
    let mut binds_ok = t.required("bind");
    for (i, (text, at)) in t.strings("bind").into_iter().enumerate() {
        match text.parse::<SocketAddr>() {
            Ok(a) => binds.push(a),
            Err(_) => {
                binds_ok = false;
                t.error_at(
                    at,
                    &format!("{}[{i}]", join(t.path, "bind")),
                    format!(
                        "invalid address \"{text}\": write IPv4 \"0.0.0.0:15002\" or IPv6 \"[::]:15002\""
                    ),
                );
            }
        }
    }
    if t.contains("bind") && binds.is_empty() && binds_ok {
        t.error("bind", "needs at least one address");
        binds_ok = false;
    }
    let backend = if t.required("backend") {
        t.str("backend")
    } else {
        None
    };
    let tpath = join(t.path, "timeout");
    let timeouts = t
        .table("timeout", &tpath)
        .map(|tt| TimeoutsPartial::read(tt, &["client", "http_request"]))
        .unwrap_or_default()
        .or(&d.timeouts);
    let maxconn = t
        .int("maxconn", 1, 1_000_000)
        .map(|n| n as usize)
        .or(d.maxconn);
    let backlog = t.int("backlog", 1, 65535).map(|n| n as u32).unwrap_or(4096);
    let grpc_mode = t.choice("mode", &[("tcp", false), ("grpc", true)]);
    let mut grpc = (grpc_mode == Some(true)).then(GrpcConfig::default);
    match &mut grpc {
        Some(g) => {
            let (spath, rpath, opath) = (
                join(t.path, "sessions"),
                join(t.path, "route"),
                join(t.path, "on_demand"),
            );
            if let Some(st) = t.table("sessions", &spath) {
                read_sessions(st, g);
            }
            if let Some(rt) = t.table("route", &rpath) {
                read_route(rt, &mut g.route);
            }
            if let Some(ot) = t.table("on_demand", &opath) {
                g.on_demand = read_on_demand(ot);
            }
            let apath = join(t.path, "auth");
            if let Some(at) = t.table("auth", &apath) {
                g.auth = security::read_auth(at);
            }
        }
        // A mode that is neither was reported already.
        None if grpc_mode.is_some() || !t.contains("mode") => {
            for (key, what) in [
                ("sessions", "has Spark sessions"),
                ("route", "routes Spark sessions"),
                ("on_demand", "routes Spark sessions"),
                (
                    "auth",
                    "checks tokens (an L4 frontend sees only TLS: use tls.client_ca)",
                ),
            ] {
                if t.contains(key) {
                    t.error(
                        key,
                        format!("only a gateway frontend {what}: add mode = \"grpc\""),
                    );
                }
            }
        }
        None => {}
    }
    let tls_path = join(t.path, "tls");
    let tls = t.table("tls", &tls_path).map(security::read_tls);
    let access = Access {
        accept_proxy: security::read_nets(t, "accept_proxy"),
        allow: security::read_nets(t, "allow"),
        deny: security::read_nets(t, "deny"),
    };
    Some(Frontend {
        access,
        // A `tls` table that did not load was reported; the frontend is not built.
        tls: match tls {
            Some(t) => Some(t?),
            None => None,
        },
        name: name?,
        binds: if binds_ok { binds } else { return None },
        backend: backend?.to_string(),
        maxconn,
        timeout_client: timeouts.client.unwrap_or(DEFAULT_IDLE),
        timeout_http_request: timeouts.http_request.unwrap_or(DEFAULT_HTTP_REQUEST),
        backlog,
        grpc,
    })
}

fn read_sessions(t: Table<'_, '_>, g: &mut GrpcConfig) {
    t.allow(&[
        "idle_timeout",
        "max_ttl",
        "cleanup_interval",
        "max",
        "max_per_client",
        "rate_per_client",
    ]);
    g.idle_timeout = positive(t, "idle_timeout").unwrap_or(g.idle_timeout);
    g.max_ttl = positive(t, "max_ttl").unwrap_or(g.max_ttl);
    g.cleanup_interval = positive(t, "cleanup_interval").unwrap_or(g.cleanup_interval);
    if let Some(n) = t.int("max", 1, 10_000_000) {
        g.max_sessions = n as usize;
    }
    g.max_per_client = match t.int("max_per_client", 1, 10_000_000) {
        Some(n) if n as usize > g.max_sessions => {
            t.error(
                "max_per_client",
                format!("{n} is more than sessions.max ({})", g.max_sessions),
            );
            g.max_sessions
        }
        Some(n) => n as usize,
        None => crate::config::default_max_per_client(g.max_sessions),
    };
    if let Some(n) = t.int("rate_per_client", 1, 1_000_000) {
        g.rate_per_client = n as u32;
    }
}

fn read_route(t: Table<'_, '_>, r: &mut RouteHeaders) {
    t.allow(&[
        "session_header",
        "namespace_header",
        "team_header",
        "environment_header",
    ]);
    for (key, slot) in [
        ("session_header", &mut r.session),
        ("namespace_header", &mut r.namespace),
        ("team_header", &mut r.team),
        ("environment_header", &mut r.environment),
    ] {
        if let Some(v) = t.str(key) {
            let ok = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !v.starts_with("grpc-");
            if ok {
                *slot = v.to_string();
            } else {
                t.error(
                    key,
                    format!("\"{v}\" is not a usable header name: lowercase letters, digits and '-', not grpc-*"),
                );
            }
        }
    }
}

fn read_on_demand(t: Table<'_, '_>) -> Option<OnDemand> {
    t.allow(&[
        "template",
        "name",
        "namespace",
        "ready_timeout",
        "max_sessions_per_team",
        "default_team",
        "default_environment",
        "pool",
    ]);
    let template = if t.required("template") {
        t.str("template").map(PathBuf::from)
    } else {
        None
    };
    if let Some(p) = &template
        && let Err(e) = crate::files::read_text(p, crate::files::MAX_CONFIG)
    {
        t.error("template", format!("cannot read {}: {e}", p.display()));
    }
    let pattern = |key: &str, default: &str| {
        let v = t.str(key).unwrap_or(default).to_string();
        let mut rest = v.as_str();
        while let Some(i) = rest.find('{') {
            let Some(j) = rest[i..].find('}') else {
                t.error(key, format!("unclosed '{{' in \"{v}\""));
                return None;
            };
            let word = &rest[i + 1..i + j];
            if !matches!(word, "team" | "environment" | "random" | "session") {
                t.error(
                    key,
                    format!("unknown placeholder {{{word}}} in \"{v}\": use {{team}}, {{environment}}, {{random}} or {{session}}"),
                );
                return None;
            }
            rest = &rest[i + j + 1..];
        }
        Some(v)
    };
    let name = pattern("name", "spark-connect-{team}-{random}");
    let namespace = pattern("namespace", "sjns-{team}-{environment}");
    let label = |key: &str| {
        let v = t.str(key)?;
        if is_dns_label(v) {
            Some(v.to_string())
        } else {
            t.error(
                key,
                format!("\"{v}\" is not a DNS label (a-z, 0-9, '-', at most 63)"),
            );
            None
        }
    };
    // Every field is read (and its errors reported) before a missing one ends the table.
    let ready_timeout = t
        .duration("ready_timeout")
        .unwrap_or(Duration::from_secs(300));
    let max_sessions_per_team = t
        .int("max_sessions_per_team", 1, 1_000_000)
        .map(|n| n as usize);
    let default_team = label("default_team");
    let default_environment = label("default_environment");
    let ppath = join(t.path, "pool");
    let pool = t.table("pool", &ppath).and_then(|pt| {
        read_pool(
            pt,
            (default_team.as_deref(), default_environment.as_deref()),
        )
    });
    // Pool drivers are named before they have a session, and wait in one namespace per
    // (team, environment).
    if pool.is_some() {
        if let Some(n) = &name
            && !n.contains("{random}")
            && !n.contains("{session}")
        {
            t.error(
                "name",
                format!(
                    "a pool's drivers need distinct names: put {{random}} or {{session}} in \"{n}\""
                ),
            );
        }
        if let Some(ns) = &namespace
            && (ns.contains("{random}") || ns.contains("{session}"))
        {
            t.error(
                "namespace",
                format!("a pool's drivers wait in one namespace per team: \"{ns}\" may use {{team}} and {{environment}} only"),
            );
        }
    }
    Some(OnDemand {
        template: template?,
        name: name?,
        namespace: namespace?,
        ready_timeout,
        max_sessions_per_team,
        default_team,
        default_environment,
        pool,
    })
}

/// A pool whose drivers wait in a namespace its backend's discovery does not watch would
/// never see them Ready, and would create them without end: refused, per team.
fn pool_is_watched(fe: &Frontend, backends: &[Option<Backend>], t: Table<'_, '_>) {
    let Some(od) = fe.grpc.as_ref().and_then(|g| g.on_demand.as_ref()) else {
        return;
    };
    let Some(pool) = &od.pool else { return };
    let Some(b) = backends.iter().flatten().find(|b| b.name == fe.backend) else {
        return;
    };
    let Some(d) = b.discovery.as_ref().filter(|d| !d.namespaces.is_empty()) else {
        return;
    };
    let (opath, ppath) = (join(t.path, "on_demand"), join(t.path, "on_demand.pool"));
    let Some(pt) = t
        .table("on_demand", &opath)
        .and_then(|ot| ot.table("pool", &ppath))
    else {
        return;
    };
    for (team, environment) in &pool.teams {
        let ns = od.pool_namespace(team, environment);
        if !d.namespaces.contains(&ns) {
            pt.error_at(
                pt.string_pos("teams", &format!("{team}/{environment}")),
                &join(pt.path, "teams"),
                format!(
                    "the drivers of {team}/{environment} would wait in namespace \"{ns}\", which backend \"{}\" does not watch (its discovery watches {}): they would never be seen Ready, and the pool would create them without end; add \"{ns}\" to its discovery's namespaces",
                    b.name,
                    d.namespaces
                        .iter()
                        .map(|n| format!("\"{n}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
}

/// `on_demand.pool = { min_ready, max_ready, max_age, teams }`; `teams` defaults to the
/// default team and environment.
fn read_pool(t: Table<'_, '_>, defaults: (Option<&str>, Option<&str>)) -> Option<Pool> {
    t.allow(&["min_ready", "max_ready", "max_age", "teams", "warm_up"]);
    let warm_up = read_warm_up(t);
    let min_ready = t.int("min_ready", 0, 1000).map(|n| n as usize);
    let max_ready = t.int("max_ready", 1, 1000).map(|n| n as usize);
    let max_age = t.duration("max_age");
    if let (Some(min), Some(max)) = (min_ready, max_ready)
        && min > max
    {
        t.error(
            "max_ready",
            format!("must be at least min_ready ({min}), got {max}"),
        );
    }
    if max_age.is_some_and(|a| a.is_zero()) {
        t.error("max_age", "must be longer than zero");
    }
    let mut teams = Vec::new();
    for (v, at) in t.strings("teams") {
        match v.split_once('/') {
            Some((team, env)) if is_dns_label(team) && is_dns_label(env) => {
                if !teams.iter().any(|(a, b)| a == team && b == env) {
                    teams.push((team.to_string(), env.to_string()));
                }
            }
            _ => t.error_at(
                at,
                &join(t.path, "teams"),
                format!("\"{v}\" is not team/environment (two DNS labels, e.g. \"data/dev\")"),
            ),
        }
    }
    if !t.contains("teams") {
        match defaults {
            (Some(team), Some(env)) => teams.push((team.to_string(), env.to_string())),
            _ => t.error(
                "teams",
                "say which teams get a pool (teams = [\"team/environment\"]), or set default_team and default_environment",
            ),
        }
    }
    Some(Pool {
        min_ready: min_ready.unwrap_or(2),
        max_ready: max_ready.unwrap_or(10).max(min_ready.unwrap_or(0)),
        max_age: max_age.unwrap_or(Duration::from_secs(2 * 3600)),
        teams,
        warm_up,
    })
}

/// Longest warm-up query accepted.
const MAX_WARM_UP_QUERY: usize = 4096;
/// Warm-up sessions per driver: a few compile what a first session uses; more only delay it.
const MAX_WARM_UP_RUNS: i64 = 20;
/// Bounds of a warm-up's timeout: a cold JVM takes seconds; a stuck one is retired.
const WARM_UP_TIMEOUT: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(30 * 60));

/// `pool.warm_up`: absent or `true` (the default query and timeout), `false` (no warm-up:
/// a driver is offered once Ready), or `{ query, timeout, runs }`.
fn read_warm_up(t: Table<'_, '_>) -> Option<WarmUp> {
    if !t.contains("warm_up") || t.is_bool("warm_up") {
        return t.bool("warm_up").unwrap_or(true).then(WarmUp::default);
    }
    if !t.is_table("warm_up") {
        t.error(
            "warm_up",
            "expected true, false or { query = \"SELECT ...\", timeout = \"2m\", runs = 3 }",
        );
        return None;
    }
    let path = join(t.path, "warm_up");
    let wt = t.table("warm_up", &path)?;
    wt.allow(&["query", "timeout", "runs"]);
    let mut w = WarmUp::default();
    if let Some(q) = wt.str("query") {
        if q.trim().is_empty() {
            wt.error(
                "query",
                "must not be empty (write warm_up = false for no warm-up)",
            );
        } else if q.len() > MAX_WARM_UP_QUERY {
            wt.error(
                "query",
                format!("{} bytes is longer than {MAX_WARM_UP_QUERY}", q.len()),
            );
        } else {
            w.query = q.to_string();
        }
    }
    if let Some(d) = wt.duration_between("timeout", WARM_UP_TIMEOUT.0, WARM_UP_TIMEOUT.1) {
        w.timeout = d;
    }
    if let Some(n) = wt.int("runs", 1, MAX_WARM_UP_RUNS) {
        w.runs = n as u32;
    }
    Some(w)
}

fn read_backend(t: Table<'_, '_>, d: &Defaults) -> Option<Backend> {
    t.allow(&[
        "name",
        "balance",
        "stick",
        "servers",
        "retries",
        "redispatch",
        "timeout",
        "check",
        "on_marked_down",
        "all_down",
        "tcp_keepalive",
        "discovery",
        "backend_token",
        "server_tls",
    ]);
    let name = check_name(t);
    let balance = if t.contains("balance") {
        t.choice("balance", BALANCES)
    } else {
        Some(d.balance.unwrap_or(Balance::RoundRobin))
    };
    let mut ok = balance.is_some();
    let stick_path = join(t.path, "stick");
    let stick = t.table("stick", &stick_path).map(|s| {
        s.allow(&["on", "expire", "size", "store"]);
        let on = s.choice(
            "on",
            &[("src", StickOn::Src), ("identity", StickOn::Identity)],
        );
        if s.contains("on") && on.is_none() {
            ok = false;
        }
        StickConfig {
            on: on.unwrap_or(StickOn::Src),
            expire: s
                .duration("expire")
                .unwrap_or(Duration::from_secs(2 * 3600)),
            size: s.int("size", 1, 100_000_000).unwrap_or(100_000) as usize,
            shared: s
                .choice("store", &[("local", false), ("shared", true)])
                .unwrap_or(false),
        }
    });
    let tpath = join(t.path, "timeout");
    let timeouts = t
        .table("timeout", &tpath)
        .map(|tt| TimeoutsPartial::read(tt, &["connect", "server", "tunnel", "queue"]))
        .unwrap_or_default()
        .or(&d.timeouts);
    let cpath = join(t.path, "check");
    let check = t
        .table("check", &cpath)
        .map(CheckPartial::read)
        .unwrap_or_default()
        .or(&d.check);

    let srv_paths = t.element_paths("servers");
    let srv_tables = t.tables("servers", &srv_paths);
    let mut servers = Vec::new();
    for st in &srv_tables {
        match read_server(*st, &check) {
            Some(s) => servers.push(s),
            None => ok = false,
        }
    }
    unique_names(&srv_tables, "server");
    if srv_tables
        .iter()
        .filter_map(|st| st.str("name"))
        .collect::<HashSet<_>>()
        .len()
        != srv_tables.len()
    {
        ok = false;
    }
    let on_marked_down = t
        .choice(
            "on_marked_down",
            &[
                ("keep", OnMarkedDown::Keep),
                ("shutdown-sessions", OnMarkedDown::ShutdownSessions),
            ],
        )
        .unwrap_or(OnMarkedDown::Keep);
    let all_down = t
        .choice(
            "all_down",
            &[
                ("fail-open", AllDown::FailOpen),
                ("reject", AllDown::Reject),
            ],
        )
        .unwrap_or(AllDown::FailOpen);
    let dpath = join(t.path, "discovery");
    let discovery = match t.table("discovery", &dpath) {
        Some(dt) => {
            dt.allow(&["kubernetes"]);
            let kpath = join(dt.path, "kubernetes");
            let read = dt.table("kubernetes", &kpath).map(read_kubernetes);
            if dt.contains("kubernetes") && !matches!(read, Some(Some(_))) {
                ok = false;
            }
            read.flatten()
        }
        None => None,
    };
    let token_path = join(t.path, "backend_token");
    let backend_token = match t.table("backend_token", &token_path) {
        Some(tt) => {
            let tok = security::read_backend_token(tt);
            ok &= tok.is_some();
            tok
        }
        None => None,
    };
    let stls_path = join(t.path, "server_tls");
    let server_tls = match t.table("server_tls", &stls_path) {
        Some(tt) => {
            let tls = security::read_server_tls(tt);
            ok &= tls.is_some();
            tls
        }
        None => None,
    };
    let mut check = check.resolve();
    check.token = backend_token.clone();
    check.tls = server_tls.clone();
    for s in &mut servers {
        s.check.token = backend_token.clone();
        s.check.tls = server_tls.clone();
    }
    let be = Backend {
        backend_token,
        server_tls,
        name: name?,
        balance: balance?,
        stick,
        servers,
        retries: t
            .int("retries", 0, 100)
            .map(|n| n as u32)
            .or(d.retries)
            .unwrap_or(3),
        redispatch: t.bool("redispatch").or(d.redispatch).unwrap_or(true),
        timeout_connect: timeouts.connect.unwrap_or(DEFAULT_CONNECT),
        timeout_server: timeouts.server.unwrap_or(DEFAULT_IDLE),
        timeout_tunnel: timeouts.tunnel,
        timeout_queue: timeouts.queue.unwrap_or(DEFAULT_QUEUE),
        on_marked_down,
        all_down,
        // Probes start after KEEPALIVE_IDLE of silence: with a shorter idle timeout sclb closes
        // the connection first, and the socket options would be dead weight.
        tcp_keepalive: t.bool("tcp_keepalive").unwrap_or_else(|| {
            timeouts.tunnel.or(timeouts.server).unwrap_or(DEFAULT_IDLE)
                > crate::sockopt::KEEPALIVE_IDLE
        }),
        check,
        discovery,
    };
    ok.then_some(be)
}

const KUBERNETES_KINDS: &[(&str, KubernetesKind)] = &[
    ("pods", KubernetesKind::Pods),
    ("endpointslices", KubernetesKind::EndpointSlices),
    ("sparkapplications", KubernetesKind::SparkApplications),
    ("sparkconnects", KubernetesKind::SparkConnects),
];

/// `[backend.discovery.kubernetes]`.
fn read_kubernetes(t: Table<'_, '_>) -> Option<KubernetesDiscovery> {
    t.allow(&[
        "kind",
        "namespace",
        "namespaces",
        "selector",
        "port",
        "kubeconfig",
    ]);
    let mut ok = true;
    let kind = if t.required("kind") {
        t.choice("kind", KUBERNETES_KINDS)
    } else {
        None
    };
    let mut namespaces = Vec::new();
    if t.contains("namespace") && t.contains("namespaces") {
        t.error(
            "namespaces",
            "set either \"namespace\" or \"namespaces\", not both",
        );
        ok = false;
    }
    if let Some(ns) = t.str("namespace") {
        namespaces.push((ns, t.pos("namespace"), join(t.path, "namespace")));
    } else if t.contains("namespace") {
        ok = false;
    }
    if t.contains("namespaces") {
        let list = t.strings("namespaces");
        if list.is_empty() {
            t.error(
                "namespaces",
                "needs at least one namespace; leave both \"namespace\" and \"namespaces\" out to watch every namespace",
            );
            ok = false;
        }
        for (i, (ns, at)) in list.into_iter().enumerate() {
            namespaces.push((ns, at, format!("{}[{i}]", join(t.path, "namespaces"))));
        }
    }
    let mut names = Vec::new();
    for (ns, at, field) in namespaces {
        if !is_dns_label(ns) {
            t.error_at(
                at,
                &field,
                format!("\"{ns}\" is not a namespace name: 1-63 of a-z 0-9 -, starting and ending with a letter or digit"),
            );
            ok = false;
        } else if names.iter().any(|n| n == ns) {
            t.error_at(at, &field, format!("namespace \"{ns}\" is listed twice"));
            ok = false;
        } else {
            names.push(ns.to_string());
        }
    }
    let selector = t.str("selector").map(str::to_string);
    if let Some(sel) = &selector
        && let Err(e) = selector::check_selector(sel)
    {
        t.error("selector", format!("invalid label selector \"{sel}\": {e}"));
        ok = false;
    }
    let port = if !t.contains("port") {
        Some(PortRef::Number(SPARK_CONNECT_PORT))
    } else if t.is_string("port") {
        {
            let name = t.str("port").unwrap_or_default();
            if is_port_name(name) {
                Some(PortRef::Name(name.to_string()))
            } else {
                t.error(
                    "port",
                    format!("\"{name}\" is not a port name: 1-15 of a-z 0-9 -, with a letter; or write a number"),
                );
                None
            }
        }
    } else {
        t.int("port", 1, 65535).map(|n| PortRef::Number(n as u16))
    };
    if let (Some(KubernetesKind::SparkConnects), Some(PortRef::Name(n))) = (kind, &port) {
        t.error(
            "port",
            format!("a SparkConnect reports only its server's IP, so the port cannot be a container port name (\"{n}\"): write a number"),
        );
        ok = false;
    }
    let kubeconfig = t.str("kubeconfig").map(PathBuf::from);
    if t.contains("kubeconfig") && kubeconfig.is_none() {
        ok = false;
    }
    if !ok {
        return None;
    }
    Some(KubernetesDiscovery {
        kind: kind?,
        namespaces: names,
        selector,
        port: port?,
        kubeconfig,
    })
}

/// A Kubernetes namespace name (an RFC 1123 label).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A container port name (an IANA service name).
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn read_server(t: Table<'_, '_>, backend_check: &CheckPartial) -> Option<ServerConfig> {
    t.allow(&["name", "addr", "weight", "maxconn", "backup", "check"]);
    let name = check_name(t);
    let addr_text = if t.required("addr") {
        t.str("addr")
    } else {
        None
    };
    let addr = addr_text.and_then(|a| match resolve(a) {
        Ok(sa) => Some(sa),
        Err(e) => {
            t.error("addr", e);
            None
        }
    });
    let weight = t
        .int("weight", 0, MAX_WEIGHT as i64)
        .map(|n| n as u32)
        .unwrap_or(1);
    let maxconn = t.int("maxconn", 1, 1_000_000).map(|n| n as usize);
    let backup = t.bool("backup").unwrap_or(false);
    let cpath = join(t.path, "check");
    let check = t
        .table("check", &cpath)
        .map(CheckPartial::read)
        .unwrap_or_default()
        .or(backend_check)
        .resolve();
    Some(ServerConfig {
        name: name?,
        uid: None,
        addr_text: addr_text?.to_string(),
        addr: addr?,
        weight,
        maxconn,
        backup,
        check,
    })
}

/// "10.0.1.11:15002", "[::1]:15002" or "host:15002" (resolved once, at load).
fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("\"{text}\" has no port: write \"host:15002\""));
    };
    if port.parse::<u16>().is_err() || host.is_empty() {
        return Err(format!(
            "invalid address \"{text}\": write \"10.0.1.11:15002\" or \"host:15002\""
        ));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("\"{host}\" resolves to no address")),
        Err(e) => Err(format!("cannot resolve \"{host}\": {e}")),
    }
}

/// Why a state-file path cannot be used, found at start (and by `sclb check`): it exists and
/// is not a regular file (a FIFO would hang the start, a device or directory is a mistake),
/// or it is a symlink.
pub fn check_state_file(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "{} is a symbolic link; give the state file's real path",
            path.display()
        )),
        Ok(m) if !m.is_file() => Err(format!(
            "{} is not a regular file (a directory, FIFO, socket or device)",
            path.display()
        )),
        Ok(_) => Ok(()),
    }
}
