//! `snat`: the controller of snat's eBPF egress NAT. `snat run` is the agent (see `agent`); the
//! other commands talk to a running agent over its control socket.

use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use snat_user::{
    agent,
    serve::{
        control::{self, Request, Response},
        render,
        report::Report,
        PoolChange,
    },
    settings::{
        cli::{
            AgentArgs, Cli, Command, ConnsArgs, PlanArgs, RunArgs, SetArgs, SetWhat, TopArgs, TopBy,
        },
        cluster::{ClusterWhat, EtcdAccess, ReleaseSettings},
        duration::Human,
        file::expand_config_file,
        plan::{self as planner, Plan, Space},
        ports::PortRange,
        EbpfLog, Interface, Settings,
    },
    tables::view::ConnFilter,
};

fn main() -> ExitCode {
    let known: Vec<String> = Cli::command()
        .find_subcommand("run")
        .map(|run| {
            run.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let argv = match expand_config_file(std::env::args_os().collect(), &known) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(argv);
    // Kernel records (`--ebpf-log debug`) go through the same logger: let them through by default.
    let default_filter = match &cli.command {
        Command::Run(a) if a.ebpf_log == EbpfLog::Debug => "debug",
        _ => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .init();
    let name = cli.command.name();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Status(args) => show(&args, render::render_status),
        Command::Stats(args) => show(&args, render::render_stats),
        Command::Conns(args) => conns(&args),
        Command::Top(args) => top(&args),
        Command::Set(args) => set(&args),
        Command::Plan(args) => plan(&args),
        Command::Cleanup(args) => agent::cleanup(&args.iface, &args.pin_dir),
        Command::Gateway(args) => snat_user::settings::cluster::GatewaySettings::validate(&args)
            .map_err(anyhow::Error::from)
            .and_then(|g| agent::gateway::run(&g)),
        Command::Cluster(c) => match c.what {
            ClusterWhat::Status(a) => EtcdAccess::validate(&a.etcd)
                .map_err(anyhow::Error::from)
                .and_then(|e| agent::admin::status(&e, a.json)),
            ClusterWhat::Release(a) => ReleaseSettings::validate(&a)
                .map_err(anyhow::Error::from)
                .and_then(|r| agent::admin::release(&r)),
            ClusterWhat::ForgetGateway(a) => EtcdAccess::validate(&a.etcd)
                .map_err(anyhow::Error::from)
                .and_then(|e| agent::admin::forget_gateway(&e, &a.name)),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.chain().find_map(|c| c.downcast_ref::<control::Denied>()) {
            // The agent refused this user: sysexits' EX_NOPERM, so scripts can tell.
            Some(denied) => {
                eprintln!("snat {name}: {denied}");
                ExitCode::from(EX_NOPERM)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Exit status of a command the agent refused for the user's lack of rights.
const EX_NOPERM: u8 = 77;

/// `snat run`: the uplink looked up and every flag checked, then the agent.
fn run(args: &RunArgs) -> anyhow::Result<()> {
    let iface =
        Interface::lookup(&args.iface).with_context(|| format!("--iface {}", args.iface))?;
    agent::run(&Settings::validate(args, iface)?)
}

fn print(r: &Report, json: bool, render: fn(&Report) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{}", render(r));
    }
    Ok(())
}

fn show(args: &AgentArgs, render: fn(&Report) -> String) -> anyhow::Result<()> {
    print(&control::report(&args.iface, None)?, args.json, render)
}

fn conns(args: &ConnsArgs) -> anyhow::Result<()> {
    let filter = ConnFilter {
        source: args.source,
        destination: args.destination,
        proto: args.proto,
    };
    print(
        &control::report(&args.agent.iface, Some(filter))?,
        args.agent.json,
        render::render_conns,
    )
}

fn top(args: &TopArgs) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut n = 0;
    loop {
        let r = control::report(&args.iface, None)?;
        if tty {
            print!("\x1b[H\x1b[2J");
        }
        println!(
            "snat top on {} (every {}; Ctrl-C to quit)",
            r.iface,
            Human(args.interval)
        );
        print!(
            "{}",
            match args.by {
                TopBy::Source => render::render_top_sources(&r),
                TopBy::Destination => render::render_top_destinations(&r),
            }
        );
        n += 1;
        if args.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(args.interval);
    }
}

fn set(args: &SetArgs) -> anyhow::Result<()> {
    let change = match &args.what {
        SetWhat::PortRange { range } => PoolChange {
            port_range: *range,
            nat_ips: None,
            nat_ips6: None,
            slice: None,
        },
        SetWhat::Plan { file, node_index } => {
            let plan = Plan::load(file)?;
            let slice = plan.slice(*node_index)?;
            // A family the plan names no NAT IP of keeps the agent's NAT IPs of that family.
            let (ips, ips6) = (plan.nat_ips4(), plan.nat_ips6());
            PoolChange {
                port_range: slice.range(),
                nat_ips: (!ips.is_empty()).then_some(ips),
                nat_ips6: (!ips6.is_empty()).then_some(ips6),
                slice: Some(format!(
                    "node {node_index} of {} ({})",
                    plan.nodes + plan.surge,
                    file.display()
                )),
            }
        }
    };
    let req = Request::Set(change);
    match control::request(&args.iface, &req).context("the agent refused the change")? {
        Response::Done { message, warnings } => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!("{message}");
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn plan(args: &PlanArgs) -> anyhow::Result<()> {
    let ips = match (args.ips, args.nat_ips.len()) {
        (Some(k), _) => k,
        (None, 0) => anyhow::bail!(
            "say how many NAT IPs the nodes share: --ips K, or list them with --nat-ip"
        ),
        (None, n) => n as u32,
    };
    let space = match (args.ports_per_ip, args.port_range) {
        (Some(m), _) => Space::azure(m)?,
        (None, Some(r)) => Space::from_range(r),
        (None, None) => Space::from_range(PortRange::DEFAULT),
    };
    let plan = planner::plan(&planner::Request {
        nodes: args.nodes,
        surge: args.surge,
        ips,
        nat_ips: args.nat_ips.clone(),
        ports_per_node: args.ports_per_node,
        space,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.render());
    }
    Ok(())
}
