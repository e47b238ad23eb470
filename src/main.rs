//! The `sclb` command: run the load balancer, check a config, talk to a running one.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use sclb::config::{self, Config, LogFormat};
use sclb::{Sclb, systemd};

#[derive(Parser)]
#[command(
    name = "sclb",
    version,
    about = "An L4 load balancer for Apache Spark Connect, operated like HAProxy"
)]
struct Cli {
    /// Config file to run with.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        default_value = "/etc/sclb/sclb.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0 if good, 1 with every error listed.
    Check,
    /// Send a command to a running sclb's admin socket, e.g. `sclb ctl show stat`.
    Ctl {
        /// Admin socket; default: `global.admin.path` of the config file.
        #[arg(short = 's', long = "socket")]
        socket: Option<PathBuf>,
        /// Seconds to wait for the reply (`wait` commands take longer).
        #[arg(short = 't', long = "timeout", default_value_t = 30)]
        timeout: u64,
        /// The command, as on HAProxy's socket (several separated by ';').
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::Ctl {
            socket,
            timeout,
            words,
        }) => ctl(&cli.config, socket, timeout, &words.join(" ")),
        None => run(&cli.config),
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(c) => {
            let servers: usize = c.backends.iter().map(|b| b.servers.len()).sum();
            println!(
                "{}: OK ({} frontends, {} backends, {} servers)",
                path.display(),
                c.frontends.len(),
                c.backends.len(),
                servers
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            if let config::LoadError::Invalid(errors) = &e {
                eprintln!("{}: {} error(s)", path.display(), errors.len());
            }
            ExitCode::FAILURE
        }
    }
}

/// `sclb ctl`: exit 0 on a normal reply, 1 on an error reply, 2 if the socket cannot be used.
fn ctl(config_path: &Path, socket: Option<PathBuf>, timeout: u64, line: &str) -> ExitCode {
    let socket = match socket {
        Some(s) => s,
        None => match config::load(config_path).map(|c| c.global.admin) {
            Ok(Some(a)) => a.path,
            Ok(None) => {
                eprintln!(
                    "{} has no [global] admin socket; pass one with -s",
                    config_path.display()
                );
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("{e}\n(pass the admin socket with -s to skip reading the config)");
                return ExitCode::from(2);
            }
        },
    };
    let reply = (|| -> std::io::Result<String> {
        let mut s = UnixStream::connect(&socket)?;
        s.set_read_timeout(Some(Duration::from_secs(timeout)))?;
        s.write_all(line.as_bytes())?;
        s.write_all(b"\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })();
    match reply {
        Ok(out) => {
            // HAProxy ends each reply with an empty line; a terminal does not need it.
            let text = out.strip_suffix('\n').unwrap_or(&out);
            print!("{text}");
            if sclb::admin::command::is_error(text) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("cannot talk to {}: {e}", socket.display());
            ExitCode::from(2)
        }
    }
}

fn init_logging(config: &Config) {
    // RUST_LOG, when set, wins over the config file (for debugging one module).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.global.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    match config.global.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let hard_stop_after = config.global.hard_stop_after;
    let source = config.source.clone();
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let sclb = match Sclb::start(config).await {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = sclb::reload::watch(sclb.shared().clone(), &source) {
        warn!(
            "cannot watch {} for changes ({e}); reload with SIGHUP or `reload`",
            source.display()
        );
    }
    info!(config = %source.display(), version = env!("CARGO_PKG_VERSION"), "sclb started");
    systemd::notify("READY=1");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", source.display());
                systemd::reloading();
                let _ = sclb.reload().await;
                systemd::notify("READY=1");
            }
            _ = term.recv() => { info!("SIGTERM: stopping gracefully"); break; }
            _ = int.recv() => { info!("SIGINT: stopping gracefully"); break; }
        }
    }
    systemd::notify("STOPPING=1");
    let cut = sclb.shutdown(hard_stop_after).await;
    info!(cut, "sclb stopped");
    ExitCode::SUCCESS
}
