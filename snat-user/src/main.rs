//! `snat`: the controller of snat's eBPF egress NAT.
//!
//! `snat run` validates its flags, loads and attaches the kernel programs, releases idle mappings
//! and answers the control socket until SIGINT/SIGTERM, then detaches everything it attached.

use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use anyhow::Context as _;
use clap::Parser as _;
use log::{error, info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    signal::unix::{signal, SignalKind},
};

use snat_user::{
    cli::{Cli, Command, RunArgs, StatsArgs},
    config::Settings,
    control,
    engine::{AttachMode, Engine},
    expiry::{self, Sweeper},
    netdev::Interface,
    stats,
    stats::Shared,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kernel records (`--ebpf-log debug`) go through the same logger: let them through by default.
    let default_filter = match &cli.command {
        Command::Run(a) if a.ebpf_log == snat_user::cli::EbpfLog::Debug => "debug",
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .init();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Stats(args) => stats_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stats_command(args: &StatsArgs) -> anyhow::Result<()> {
    let answer = control::request(&args.iface, "stats")?;
    if args.json {
        println!("{answer}");
    } else {
        let v: serde_json::Value =
            serde_json::from_str(&answer).context("parsing the agent's answer")?;
        print!("{}", stats::render(&v));
    }
    Ok(())
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    // Everything is checked before anything is attached.
    let iface =
        Interface::lookup(&args.iface).with_context(|| format!("--iface {}", args.iface))?;
    let settings = Settings::validate(args, iface)?;
    for w in settings.warnings() {
        warn!("{w}");
    }
    let listener = control::bind(&settings.iface.name)?;

    let mut engine = Engine::load(&settings)?;
    let tables = engine.take_tables()?;
    let counters = engine.take_counters()?;
    let logger = if settings.ebpf_log == snat_user::cli::EbpfLog::Off {
        None
    } else {
        Some(
            aya_log::EbpfLogger::init(engine.ebpf_mut())
                .context("starting the kernel log reader")?,
        )
    };
    let mode = engine.attach(settings.attach)?;
    info!(
        "snat running on {} ({}): NAT IPs {}, ports {}, internal {}",
        settings.iface.name,
        match mode {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact { .. } => "clsact",
        },
        settings
            .nat_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        settings.port_range,
        settings
            .internal
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );

    let shared = Arc::new(Shared {
        settings: settings.clone(),
        counters,
        tables: Mutex::new(tables),
        sweeper: Mutex::new(Sweeper::default()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let gc = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("snat-gc".into())
            .spawn(move || gc_loop(&shared, &stop))?
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(serve(listener, shared.clone(), logger));

    stop.store(true, Ordering::Relaxed);
    gc.thread().unpark();
    let _ = gc.join();
    drop(engine);
    let summary = stats::snapshot(&shared)?;
    if let Some(path) = &args.stats_file {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing --stats-file {}", path.display()))?;
    }
    info!("final counters:\n{}", stats::render(&summary));
    served
}

/// Releases idle mappings every `--gc-interval` until `stop`.
fn gc_loop(shared: &Shared, stop: &AtomicBool) {
    let interval = shared.settings.gc_interval;
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(interval);
        let mut tables = shared
            .tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sweeper = shared
            .sweeper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = sweeper.sweep(&mut tables, &shared.settings.timeouts, expiry::now_ns()) {
            error!("expiry sweep failed: {e:#}");
        }
    }
}

/// Answers the control socket until SIGINT or SIGTERM.
async fn serve(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    if let Some(logger) = logger {
        tokio::spawn(read_kernel_log(logger));
    }
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: stopping"); return Ok(()); }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); return Ok(()); }
            conn = listener.accept() => {
                let (stream, _) = conn?;
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &shared).await {
                        warn!("control request failed: {e:#}");
                    }
                });
            }
        }
    }
}

async fn answer(stream: tokio::net::UnixStream, shared: &Arc<Shared>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply = match line.trim() {
        "stats" => {
            let shared = shared.clone();
            let v = tokio::task::spawn_blocking(move || stats::snapshot(&shared)).await??;
            serde_json::to_string(&v)?
        }
        other => serde_json::json!({ "error": format!("unknown command {other:?}") }).to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// Forwards kernel log records (`--ebpf-log`) to the agent's log. Polling keeps it simple; the
/// ring buffer holds 128 KiB, far more than 50 ms of debug records.
async fn read_kernel_log(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tick.tick().await;
        logger.flush();
    }
}
