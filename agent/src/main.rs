//! The `silt` command line.

use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "iceberg")]
use std::time::Duration;

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
    /// Log lines on stderr as text, or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// A config file, or a directory of *.toml files merged in name order
        /// (base.toml, site/*.toml, ..., device.toml when it has base.toml).
        /// Without it, the built-in quickstart config (configs/quickstart.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config, load its plugins and print the pipeline.
    Check {
        #[arg(short, long)]
        config: PathBuf,
        /// Print the merged config, each key with the file:line that set it.
        #[arg(long)]
        print: bool,
    },
    /// Inspect the spool of a stopped agent.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// List, show and replay batches a sink's store refused for good.
    DeadLetter {
        #[command(subcommand)]
        command: DeadLetterCommand,
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

/// Where the dead-letter area is: `<data_dir>/dead-letter`, or the
/// `agent.dead_letter` directory when the config sets one.
#[derive(clap::Args)]
struct DeadLetterDir {
    /// The agent's data_dir.
    #[arg(short, long, required_unless_present = "dead_letter_dir")]
    data_dir: Option<PathBuf>,
    /// The agent's `dead_letter` directory, when set in its config.
    #[arg(long)]
    dead_letter_dir: Option<PathBuf>,
}

impl DeadLetterDir {
    fn path(&self) -> PathBuf {
        match (&self.dead_letter_dir, &self.data_dir) {
            (Some(dir), _) => dir.clone(),
            (None, Some(data)) => data.join("dead-letter"),
            (None, None) => unreachable!("clap requires one of them"),
        }
    }
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// One line per dead-lettered batch or transform file: id, sink (or
    /// transform), size, reason, state, key.
    List {
        #[command(flatten)]
        dir: DeadLetterDir,
        #[arg(long)]
        sink: Option<String>,
    },
    /// A batch's record (JSON), or with --body its stored object.
    Show {
        #[command(flatten)]
        dir: DeadLetterDir,
        id: String,
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        body: bool,
    },
    /// Write batches again under their own keys (or run a transform's files
    /// through it again), once the cause is fixed; a running agent does it
    /// within 5 s, a stopped one when it starts.
    Replay {
        #[command(flatten)]
        dir: DeadLetterDir,
        #[arg(long)]
        sink: Option<String>,
        /// Files a transform failed on: run them through it again.
        #[arg(long, conflicts_with = "sink")]
        transform: Option<String>,
        /// One batch; or --all.
        #[arg(long)]
        id: Option<String>,
        /// Every replayable batch (of --sink when given).
        #[arg(long)]
        all: bool,
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
    /// Create a plugin crate (SDK, unit test, fixture, README) ready to build.
    New {
        /// Crate name, e.g. `tag-site`.
        name: String,
        /// Where to create it [default: plugins/NAME in this silt checkout,
        /// added to the plugins workspace]; elsewhere a standalone crate.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SILT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config, print } => check(config, print),
        Command::Spool { command } => spool(command),
        Command::DeadLetter { command } => dead_letter(command),
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
        Command::Plugin {
            command: PluginCommand::New { name, dir },
        } => silt::plugin::scaffold::plugin_new_cli(&name, dir.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: silt's errors already quote
/// their cause, anyhow's context does not.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&cause);
        }
    }
    out
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

fn dead_letter(command: DeadLetterCommand) -> anyhow::Result<()> {
    use silt::dead_letter::cli;
    let mut out = std::io::stdout().lock();
    match command {
        DeadLetterCommand::List { dir, sink } => {
            let n = cli::list(&dir.path(), sink.as_deref(), &mut out)?;
            eprintln!("{n} dead-lettered batches");
        }
        DeadLetterCommand::Show {
            dir,
            id,
            sink,
            body,
        } => cli::show(&dir.path(), sink.as_deref(), &id, body, &mut out)?,
        DeadLetterCommand::Replay {
            dir,
            sink,
            transform,
            id,
            all,
        } => {
            let chosen = cli::Chosen {
                sink: sink.as_deref(),
                transform: transform.as_deref(),
                id: id.as_deref(),
                all,
            };
            let n = cli::replay(&dir.path(), chosen)?;
            eprintln!(
                "asked for {n} batches to be written again: a running agent does it within {:?}, a stopped one when it starts; `silt dead-letter list` shows what is left",
                silt::batch::REPLAY_SCAN_EVERY
            );
        }
    }
    Ok(())
}

fn check(path: PathBuf, print: bool) -> anyhow::Result<()> {
    if print {
        // Stdout stays TOML: the merged config, then comments.
        let (config, annotated) = silt::config::load_annotated(&path)?;
        print!("{annotated}");
        let plugins = silt::transform::load_plugins(&config)?;
        println!("\n# plugins loaded and initialised: {}", plugins.len());
        println!("# config ok: {}", path.display());
        return Ok(());
    }
    let config = silt::config::load(&path)?;
    let plugins = silt::transform::load_plugins(&config)?;
    for warning in silt::config::warnings(&config) {
        eprintln!("warning: {warning}");
    }
    print!("{}", config.graph());
    if !plugins.is_empty() {
        println!("plugins loaded and initialised: {}", plugins.len());
    }
    #[cfg(feature = "iceberg")]
    print_tables(&config)?;
    println!("config ok: {}", path.display());
    Ok(())
}

/// Each Iceberg table's current schema, when its catalog answers within a
/// few seconds; a device offline at check time is no config error.
#[cfg(feature = "iceberg")]
fn print_tables(config: &silt::config::Config) -> anyhow::Result<()> {
    let tables: Vec<_> = config
        .sinks
        .iter()
        .filter_map(|(name, sink)| Some((name, sink, sink.table.as_ref()?)))
        .collect();
    if tables.is_empty() {
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    for (name, sink, table) in tables {
        let parts = silt::batch::KeyTemplate::parse(&sink.key()).map_err(anyhow::Error::msg)?;
        let target = silt::table::TableSink::new(
            &config.agent.id,
            name,
            sink,
            table,
            parts.parts(),
            Default::default(),
        );
        let label = format!("sink {name}: table {}.{}", table.namespace, table.name);
        let described = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), target.describe()).await
        });
        match described {
            Ok(Ok(Some(schema))) => println!("{label}:\n{schema}"),
            Ok(Ok(None)) if table.create => {
                println!("{label}: not created yet; the first batch creates it")
            }
            Ok(Ok(None)) => println!(
                "{label}: does not exist; create it or set `create = true` (batches wait until then)"
            ),
            Ok(Err(e)) => println!("{label}: not checked: {e}"),
            Err(_) => println!("{label}: not checked: the catalog did not answer within 5s"),
        }
    }
    Ok(())
}

/// The quickstart config, compiled in so `silt run` works with no files.
const QUICKSTART: &str = include_str!("../../configs/quickstart.toml");

fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match &path {
        Some(path) => silt::config::load(path)?,
        None => silt::config::load_str(QUICKSTART, "<built-in configs/quickstart.toml>")?,
    };
    tune_allocator_for_a_small_device();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        // The built-in config has no file to reload from.
        let reloader = match &path {
            Some(path) => {
                let reloader = silt::reload::Reloader::new(path);
                reloader.listen_for_sighup()?;
                Some(reloader)
            }
            None => None,
        };
        silt::run_with_reload(config, shutdown, reloader).await
    })
}

/// glibc's defaults cost an edge device tens of MiB: up to 8 arenas per
/// core, each keeping what its threads freed, and an mmap threshold that
/// rises after each large free so later 8 MiB multipart parts stay in those
/// arenas (a 200 MiB upload grew the agent by 20-68 MiB, the identity plugin
/// bench peaked at 80 MiB). Two arenas and a fixed 4 MiB threshold: 11-12 MiB
/// and 50-60 MiB, with no measurable CPU cost (bench/footprint, 3 runs).
/// glibc's own variables, when an operator sets them, win.
fn tune_allocator_for_a_small_device() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, parameter, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 4 << 20),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only changes allocator parameters and runs
            // before the runtime starts any thread.
            unsafe { libc::mallopt(parameter, value) };
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
