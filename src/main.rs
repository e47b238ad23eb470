//! The `sclb` command: run the load balancer, check a config, talk to a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use sclb::Sclb;
use sclb::config::{self, Config, LogFormat};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        None => run(&cli.config),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
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

fn init_logging(config: &Config) {
    // RUST_LOG, when set, wins over the config file (for debugging one module).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&config.global.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.global.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(path: &std::path::Path) -> ExitCode {
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
    let sclb = match Sclb::start(config).await {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    info!(config = %source.display(), version = env!("CARGO_PKG_VERSION"), "sclb started");
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping gracefully"),
        _ = int.recv() => info!("SIGINT: stopping gracefully"),
    }
    let cut = sclb.shutdown(hard_stop_after).await;
    info!(cut, "sclb stopped");
    ExitCode::SUCCESS
}
