//! Config fixtures: every file under `valid/` (and the shipped `conf/`) loads; every file under
//! `invalid/` fails with exactly the errors in its `.expected` file (`FILE` stands for its path).

use std::path::Path;

use sclb::config::{self, LoadError};

fn toml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn valid_fixtures_and_shipped_configs_load() {
    let mut files = toml_files("tests/fixtures/config/valid");
    files.extend(toml_files("conf"));
    assert!(files.len() >= 2);
    for f in files {
        if let Err(e) = config::load(&f) {
            panic!("{} should load:\n{e}", f.display());
        }
    }
}

#[test]
fn invalid_fixtures_report_every_error_with_file_line_and_field() {
    let files = toml_files("tests/fixtures/config/invalid");
    assert!(files.len() >= 4);
    for f in files {
        let expected = std::fs::read_to_string(f.with_extension("expected"))
            .unwrap_or_else(|_| panic!("{} has no .expected file", f.display()));
        let got = match config::load(&f) {
            Ok(_) => panic!("{} should not load", f.display()),
            Err(LoadError::Invalid(errors)) => errors
                .iter()
                .map(|e| format!("{e}\n").replacen(&f.display().to_string(), "FILE", 1))
                .collect::<String>(),
            Err(e) => panic!("{}: unexpected error {e}", f.display()),
        };
        assert_eq!(got, expected, "errors for {}", f.display());
    }
}

#[test]
fn full_fixture_values_are_typed_and_defaults_apply() {
    use std::time::Duration;
    let c = config::load(Path::new("tests/fixtures/config/valid/full.toml")).unwrap();
    let be = &c.backends[0];
    assert_eq!(be.balance, config::Balance::Source);
    assert_eq!(be.timeout_connect, Duration::from_secs(1));
    assert_eq!(be.timeout_tunnel, Some(Duration::from_secs(7200)));
    assert_eq!(be.retries, 5);
    assert_eq!(be.stick.as_ref().unwrap().expire, Duration::from_secs(1800));
    // Check settings merge field by field: defaults < backend < server.
    let sc1 = &be.servers[0].check;
    assert_eq!(sc1.kind, config::CheckType::H2);
    assert_eq!(sc1.port, Some(15003));
    assert_eq!(sc1.rise, 3);
    assert_eq!(sc1.fastinter, Duration::from_secs(1));
    assert_eq!(sc1.init_state, config::InitState::FullyDown);
    let sc2 = &be.servers[1].check;
    assert_eq!(sc2.kind, config::CheckType::Spark);
    assert_eq!(sc2.init_state, config::InitState::Up);
    assert!(be.servers[1].backup);
    assert_eq!(be.servers[2].weight, 0);
    let fe = &c.frontends[0];
    assert_eq!(fe.binds.len(), 2);
    assert_eq!(fe.timeout_client, Duration::from_secs(3600));
    assert_eq!(fe.maxconn, Some(300));
    assert_eq!(c.global.admin.as_ref().unwrap().mode, 0o660);
}

#[test]
fn shipped_defaults_do_not_cut_long_spark_sessions() {
    let c = config::parse(
        Path::new("min.toml"),
        r#"
[[frontend]]
name = "f"
bind = ["127.0.0.1:0"]
backend = "b"
[[backend]]
name = "b"
servers = [ { name = "s", addr = "127.0.0.1:1" } ]
"#,
    )
    .unwrap();
    let idle = c.frontends[0]
        .timeout_client
        .min(c.backends[0].timeout_server);
    assert!(idle >= std::time::Duration::from_secs(4 * 3600), "{idle:?}");
    assert_eq!(c.backends[0].servers[0].check.rise, 2);
    assert_eq!(c.backends[0].servers[0].check.fall, 3);
}

/// `tcp_keepalive` (HAProxy `option srvtcpka`): on by default where a connection can sit idle
/// long enough for a probe (idle timeout over the 60 s before the first one), off where sclb's
/// own idle timeout closes it first; an explicit value wins.
#[test]
fn server_tcp_keepalive_defaults_on_only_where_connections_idle_past_a_probe() {
    let keepalive = |backend_extra: &str| {
        let text = format!(
            r#"
[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"
[[backend]]
name = "be"
servers = [ {{ name = "s1", addr = "127.0.0.1:1" }} ]
{backend_extra}
"#
        );
        let c = config::parse(Path::new("t.toml"), &text).unwrap();
        c.backends[0].tcp_keepalive
    };
    assert!(
        keepalive(""),
        "4 h idle timeouts: Spark sessions idle for hours"
    );
    assert!(!keepalive(r#"timeout = { server = "30s" }"#));
    assert!(!keepalive(r#"timeout = { tunnel = "60s" }"#));
    assert!(keepalive(r#"timeout = { server = "30s", tunnel = "1h" }"#));
    assert!(!keepalive("tcp_keepalive = false"));
    assert!(keepalive(
        "tcp_keepalive = true\ntimeout = { server = \"10s\" }"
    ));
}

#[test]
fn a_warm_pool_reads_into_typed_settings() {
    let c = config::load(Path::new("tests/fixtures/config/valid/gateway.toml")).unwrap();
    let od = c
        .frontends
        .iter()
        .find_map(|f| f.grpc.as_ref()?.on_demand.clone())
        .expect("an on-demand frontend");
    let pool = od.pool.expect("its pool");
    assert_eq!((pool.min_ready, pool.max_ready), (2, 10));
    assert_eq!(pool.max_age, std::time::Duration::from_secs(7200));
    assert_eq!(
        pool.teams,
        [("data".into(), "dev".into()), ("ml".into(), "prod".into())]
    );
    assert_eq!(
        pool.warm_up,
        Some(config::WarmUp {
            query: "SELECT sum(id) FROM range(10)".into(),
            timeout: std::time::Duration::from_secs(90),
            runs: 3,
        })
    );
}

/// `pool.warm_up`: on by default (a small Spark job, 2 minutes), off with `false`.
#[test]
fn a_pool_warms_its_drivers_up_unless_told_not_to() {
    let text = std::fs::read_to_string("tests/fixtures/config/valid/gateway.toml").unwrap();
    let written = r#", warm_up = { query = "SELECT sum(id) FROM range(10)", timeout = "90s" }"#;
    assert!(text.contains(written));
    let warm_up = |setting: &str| {
        let c = config::parse(Path::new("gateway.toml"), &text.replace(written, setting)).unwrap();
        c.frontends
            .iter()
            .find_map(|f| f.grpc.as_ref()?.on_demand.clone()?.pool)
            .expect("a pool")
            .warm_up
    };
    let default = Some(config::WarmUp {
        query: "SELECT count(*) FROM range(1000)".into(),
        timeout: std::time::Duration::from_secs(120),
        runs: 3,
    });
    assert_eq!(warm_up(""), default);
    assert_eq!(warm_up(", warm_up = true"), default);
    assert_eq!(warm_up(", warm_up = false"), None);
    assert_eq!(
        warm_up(r#", warm_up = { timeout = "5m" }"#).map(|w| (w.query, w.timeout)),
        Some((
            "SELECT count(*) FROM range(1000)".into(),
            std::time::Duration::from_secs(300)
        ))
    );
    assert_eq!(
        warm_up(r#", warm_up = { runs = 1 }"#).map(|w| w.runs),
        Some(1)
    );
}
