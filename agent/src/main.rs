//! The `silt` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "silt",
    version,
    about = "Edge agent: MQTT and HTTP in, durable spool, batched objects out to S3"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// A config file, or a directory of *.toml files merged in name order.
        /// Without it, the built-in quickstart config (configs/quickstart.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config, load its plugins and print the pipeline.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Inspect the spool of a stopped agent.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Work with WebAssembly transform plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Backlog per sink: records, bytes, sealed batches, oldest age.
    Stats {
        /// The agent's data_dir.
        #[arg(short, long)]
        data_dir: PathBuf,
    },
    /// Verify every record's checksum and every sealed batch.
    Check {
        #[arg(short, long)]
        data_dir: PathBuf,
        /// Move corrupt entries to <data_dir>/quarantine and remove them.
        #[arg(long)]
        repair: bool,
    },
    /// Print pending records as NDJSON.
    Export {
        #[arg(short, long)]
        data_dir: PathBuf,
        /// Only this sink's records.
        #[arg(long)]
        sink: Option<String>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a plugin on NDJSON events and print what it emits, as NDJSON.
    Test {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// The plugin's config, as JSON.
        #[arg(long, default_value = "{}")]
        config: String,
        /// NDJSON input, one `{"topic":..,"payload":..}` per line; stdin when absent.
        #[arg(long)]
        input: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SILT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::Spool { command } => spool(command),
        Command::Plugin {
            command:
                PluginCommand::Test {
                    plugin,
                    config,
                    input,
                },
        } => silt::plugin::cli::plugin_test(
            &plugin,
            &config,
            input.as_deref(),
            &mut std::io::stdout().lock(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn spool(command: SpoolCommand) -> anyhow::Result<()> {
    use silt::spool::inspect;
    let mut out = std::io::stdout().lock();
    match command {
        SpoolCommand::Stats { data_dir } => {
            inspect::print_stats(&inspect::stats(&data_dir)?, &mut out)?
        }
        SpoolCommand::Check { data_dir, repair } => {
            let report = inspect::check(&data_dir, repair)?;
            for problem in &report.problems {
                println!("{problem}");
            }
            println!(
                "checked {} records and {} sealed batches: {} problems, {} repaired",
                report.records,
                report.batches,
                report.problems.len(),
                report.repaired
            );
            if report.problems.len() as u64 > report.repaired {
                anyhow::bail!(
                    "the spool has corrupt entries; run `silt spool check --repair -d {}`",
                    data_dir.display()
                );
            }
        }
        SpoolCommand::Export { data_dir, sink } => {
            let n = inspect::export(&data_dir, sink.as_deref(), &mut out)?;
            eprintln!("exported {n} records");
        }
    }
    Ok(())
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = silt::config::load(&path)?;
    let plugins = silt::transform::load_plugins(&config)?;
    print!("{}", config.graph());
    if !plugins.is_empty() {
        println!("plugins loaded and initialised: {}", plugins.len());
    }
    println!("config ok: {}", path.display());
    Ok(())
}

/// The quickstart config, compiled in so `silt run` works with no files.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match path {
        Some(path) => silt::config::load(&path)?,
        None => silt::config::load_str(QUICKSTART, "<built-in configs/quickstart.toml>")?,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        silt::run(config, shutdown).await
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
