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

use sclb::access_log::{AccessLog, LogGuard};
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
        /// Seconds to wait for the reply; a `wait <timeout>` command adds its own timeout.
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
            let discovered = c.backends.iter().filter(|b| b.discovery.is_some()).count();
            println!(
                "{}: OK ({} frontends, {} backends, {} servers{})",
                path.display(),
                c.frontends.len(),
                c.backends.len(),
                servers,
                if discovered > 0 {
                    format!(" + {discovered} Kubernetes discovery source(s)")
                } else {
                    String::new()
                }
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
    // `wait 10m srv-removable ...` answers when the server is removable or after its own
    // timeout: the client waits for that, plus the usual reply timeout.
    let waits: Duration = sclb::admin::command::split_line(line)
        .iter()
        .filter_map(|c| match sclb::admin::command::parse(c) {
            Ok(sclb::admin::command::Command::WaitRemovable { timeout, .. }) => Some(timeout),
            _ => None,
        })
        .sum();
    let read_timeout = Duration::from_secs(timeout.max(1)).saturating_add(waits);
    let reply = (|| -> std::io::Result<String> {
        let mut s = UnixStream::connect(&socket)?;
        s.set_read_timeout(Some(read_timeout))?;
        s.write_all(line.as_bytes())?;
        s.write_all(b"\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })();
    match reply {
        // Every reply ends with an empty line: nothing at all means sclb went away first.
        Ok(out) if out.is_empty() => {
            eprintln!(
                "{} closed the connection without answering (sclb stopped?)",
                socket.display()
            );
            ExitCode::from(2)
        }
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

/// Logs go to stderr (journald under systemd) through [`AccessLog`]: each thread buffers its
/// lines and one writer thread writes them in batches, so a connection's log line costs its
/// task no system call. If the writer falls behind by 1 MiB per thread, lines are dropped and
/// counted (`sclb_log_dropped_total`) rather than slowing traffic down, as HAProxy drops logs;
/// the guard writes what is buffered at exit.
fn init_logging(config: &Config) -> std::io::Result<LogGuard> {
    // RUST_LOG, when set, wins over the config file (for debugging one module).
    // kube-client logs an ERROR of its own for every failed connect to the API server;
    // sclb's discovery already logs (and counts) each fault once, in its own words.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},kube_client::client::builder=off",
            config.global.log.level
        ))
    });
    let (writer, guard) = AccessLog::start(std::io::stderr())?;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match config.global.log.format {
        LogFormat::Json => builder
            .json()
            .event_format(sclb::log_format::Json::default())
            .init(),
        // A person at a terminal gets the default formatter's colours; journald and files
        // get the same layout written for a fraction of its cost (src/log_format.rs).
        LogFormat::Text if ansi => builder.init(),
        LogFormat::Text => builder.event_format(sclb::log_format::Text).init(),
    }
    Ok(guard)
}

fn run(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let _log_guard = match init_logging(&config) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cannot start the log writer thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before anything is bound: a second sclb on the same config must not share its ports or
    // take its admin socket.
    let _claim = match sclb::instance::claim(path) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let threads = match config.global.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let workers = match Workers::start(threads) {
        Ok(w) => w,
        Err(e) => {
            error!("cannot start the worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The control plane (health checks, admin socket, stats page, reloads) runs on the main
    // thread; connections run on the workers.
    let control = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = control.block_on(serve(config, workers.handles.clone()));
    workers.stop();
    code
}

/// Thread-per-core data plane: one single-threaded runtime per worker thread. A connection is
/// accepted, proxied and closed on one thread, with its own epoll: no task hops between CPUs
/// and no wake-up crosses threads on the hot path.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(n: usize) -> std::io::Result<Workers> {
        let mut w = Workers {
            handles: Vec::new(),
            stop: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            w.handles.push(rt.handle().clone());
            w.stop.push(tx);
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("sclb-worker-{i}"))
                    .spawn(move || {
                        rt.block_on(async {
                            tokio::spawn(keep_timer_awake());
                            let _ = rx.await;
                        })
                    })?,
            );
        }
        Ok(w)
    }

    fn stop(self) {
        drop(self.stop);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A worker's runtime writes its own wake-up eventfd whenever a task sets a timer earlier
/// than the one it last went to sleep for, or any timer when it slept with none: on an idle
/// worker that was every connection's connect timeout, one `write` system call (and one more
/// wake-up event) per connection. A timer a second away at all times makes every
/// connection's timer (connect, queue, idle: by default all a second or longer) a later one,
/// at the cost of one wake-up per second.
async fn keep_timer_awake() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Switches to `run_as` for good (groups, gid, then uid), once every socket is bound. Only
/// root can; an unprivileged sclb already running as that user has nothing to do.
fn drop_privileges(run_as: &config::RunAs) -> nix::Result<()> {
    use nix::unistd::{Gid, Uid, getuid, setgid, setgroups, setuid};
    if getuid().as_raw() == run_as.uid {
        return Ok(());
    }
    let gid = Gid::from_raw(run_as.gid);
    setgroups(&[gid])?;
    setgid(gid)?;
    setuid(Uid::from_raw(run_as.uid))?;
    info!(user = %run_as.user, uid = run_as.uid, gid = run_as.gid, "dropped root privileges");
    Ok(())
}

async fn serve(config: Config, workers: Vec<tokio::runtime::Handle>) -> ExitCode {
    let source = config.source.clone();
    let run_as = config.global.run_as.clone();
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let sclb = match Sclb::start_on(config, workers).await {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(run_as) = &run_as
        && let Err(e) = drop_privileges(run_as)
    {
        // Asked not to run as root: refusing to go on is safer than serving as root.
        error!("cannot switch to user {}: {e}", run_as.user);
        let _ = sclb.shutdown(Duration::ZERO).await;
        return ExitCode::FAILURE;
    }
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
    // The running config's: a reload applies it at once.
    let hard_stop_after = sclb.state().snapshot().config.global.hard_stop_after;
    let cut = sclb.shutdown(hard_stop_after).await;
    info!(cut, "sclb stopped");
    ExitCode::SUCCESS
}
