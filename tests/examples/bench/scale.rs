//! Scale: what 10 k, 100 k and 1 M mappings cost.
//!
//! - The agent (`snat run --max-mappings N` on the lab's uplink): the kernel memory of its maps
//!   (`memlock:` of each map fd in `/proc/<agent>/fdinfo`), its RSS before and after its tables
//!   are filled with N synthetic established TCP mappings (written from here, through the maps'
//!   ids), the CPU it spends while they sit idle, and how long `snat status` takes with them.
//!   Synthetic mappings send the agent no expiry events, so the agent that holds them is a second
//!   one, which takes the filled tables over from the first (`--keep-state`, a bpffs of the
//!   bench's own) and looks at every mapping once at start, as after a restart: its idle CPU is
//!   then the agent's with N mappings it knows of, and the time of that full pass is reported.
//! - Expiry: in this process, an engine with N mappings and
//!   [`snat_user::tables::expiry::Sweeper::sweep`] with timeouts that make every one expired, releasing
//!   through the kernel's release program as the agent does: the time to sweep them all.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use snat_user::{
    settings::Timeouts,
    tables::expiry::{now_ns, Sweeper},
};
use tests::{
    agent::Agent,
    netns::BpfFs,
    tables::{self, AgentTables},
    topo::POD_CIDR,
};

use crate::{
    datapath::load_engine,
    lab::{in_netns, Lab, PORT_RANGE},
    say, Plan,
};

/// What N mappings cost.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub mappings: u32,
    /// Kernel memory of SNAT_FWD + SNAT_REV, and of all the agent's maps (bytes).
    pub tables_bytes: u64,
    pub all_maps_bytes: u64,
    pub maps: BTreeMap<String, u64>,
    /// Agent RSS (KiB): after start, and with N mappings after a `snat status`.
    pub rss_start_kib: u64,
    pub rss_full_kib: u64,
    pub hwm_kib: u64,
    /// CPU the agent used while holding N idle mappings (cores, i.e. CPU seconds per second),
    /// over `idle_secs` after its full pass at start.
    pub idle_cpu: f64,
    pub idle_secs: f64,
    /// The agent's full pass at start (every mapping looked at), as it logged it.
    pub full_pass_secs: f64,
    pub status_secs: f64,
    pub fill_secs: f64,
    /// In-process expiry: the time one sweep took to release all N, and how many it released.
    pub sweep_secs: f64,
    pub swept: u64,
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process, in seconds.
pub fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks() as f64
}

/// Clock ticks per second (the unit of `/proc/stat` and of a task's `stat`).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(0).max(1)
}

/// CPU time of all the threads of a process, in seconds, to the nanosecond (the scheduler's
/// `/proc/<pid>/task/*/schedstat`; threads that ended are not in it).
pub fn cpu_secs_fine(pid: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// CPU is watched this long while the mappings sit idle.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// The full pass the agent logs at start: "expiry: looked at all N mappings in T (…".
fn full_pass(log: &str) -> Option<(u64, f64)> {
    let rest = log.split("expiry: looked at all ").nth(1)?;
    let (n, rest) = rest.split_once(" mappings in ")?;
    let took = rest.split_whitespace().next()?;
    let secs = if let Some(ms) = took.strip_suffix("ms") {
        ms.parse::<f64>().ok()? / 1000.0
    } else if let Some(us) = took.strip_suffix("µs") {
        us.parse::<f64>().ok()? / 1e6
    } else {
        took.strip_suffix('s')?.parse().ok()?
    };
    Some((n.parse().ok()?, secs))
}

/// The agent's side of row `n`.
fn agent_side(lab: &Lab, n: u32, row: &mut Row) -> anyhow::Result<()> {
    let max = n.to_string();
    let bpffs = BpfFs::new(&format!("{}-sc{n}", lab.topo.prefix));
    let args = |extra: &'static str| {
        vec![
            "--internal",
            POD_CIDR,
            "--port-range",
            PORT_RANGE,
            "--max-mappings",
            max.as_str(),
            "--pin-dir",
            bpffs.arg(),
            extra,
        ]
    };
    let filler = Agent::start(&lab.topo.node, &lab.topo.uplink, &args("--keep-state"));
    let pid = filler.pid().to_string();
    let maps = tables::process_maps(filler.pid())?;
    row.tables_bytes = ["SNAT_FWD", "SNAT_REV"]
        .iter()
        .filter_map(|m| maps.get(*m).map(|&(_, b)| b))
        .sum();
    row.all_maps_bytes = maps.values().map(|&(_, b)| b).sum();
    row.maps = maps.iter().map(|(k, &(_, b))| (k.clone(), b)).collect();
    std::thread::sleep(Duration::from_millis(500));
    row.rss_start_kib = status_kib(&pid, "VmRSS");

    let mut agent_tables = AgentTables::of_process(filler.pid())?;
    row.fill_secs = agent_tables.fill(n, now_ns(), &mut crate::check)?;
    drop(agent_tables);
    let (status, _) = filler.stop();
    if !status.success() {
        bail!("the agent that was filled stopped with {status}");
    }

    // The agent that holds them: it takes the tables over and looks at all of them once.
    let agent = Agent::start(&lab.topo.node, &lab.topo.uplink, &args("--on-stop=open"));
    let pid = agent.pid().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let (seen, took) = loop {
        crate::check()?;
        if let Some(found) = full_pass(&agent.log()) {
            break found;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not log its full pass within 300 s:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if seen != u64::from(n) {
        bail!("the agent's full pass saw {seen} mappings, {n} were written");
    }
    row.full_pass_secs = took;
    // Then watch its CPU while nothing is due (established mappings idle 2h4m).
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_secs(&pid), Instant::now());
    std::thread::sleep(IDLE_WINDOW);
    row.idle_secs = t0.elapsed().as_secs_f64();
    row.idle_cpu = (cpu_secs(&pid) - c0) / row.idle_secs;
    crate::check()?;
    let started = Instant::now();
    let status = agent.json("status", &[]);
    row.status_secs = started.elapsed().as_secs_f64();
    let tcp = status["mappings"]["tcp"].as_u64().unwrap_or(0);
    if tcp != u64::from(n) {
        bail!("the agent reports {tcp} TCP mappings, {n} were written");
    }
    row.rss_full_kib = status_kib(&pid, "VmRSS");
    row.hwm_kib = status_kib(&pid, "VmHWM");
    drop(agent);
    Ok(())
}

/// The in-process sweep of row `n` (run in a namespace of our own).
fn sweep_side(n: u32) -> anyhow::Result<(f64, u64)> {
    let mut engine = load_engine(n, false)?;
    let mut tables = engine.take_tables()?;
    tables::fill(
        &mut tables.fwd,
        &mut tables.rev,
        n,
        now_ns(),
        &mut crate::check,
    )?;
    let s = Duration::from_secs(1);
    let timeouts = Timeouts {
        tcp_established: s,
        tcp_transitory: s,
        tcp_fin: s,
        tcp_rst: s,
        udp: s,
        udp_ports: Default::default(),
        icmp: s,
    };
    let later = now_ns() + 3_600_000_000_000;
    let mut sweeper = Sweeper::default();
    let started = Instant::now();
    let released = sweeper.sweep(&mut tables, &|e| engine.release(e), &timeouts, later)?;
    let secs = started.elapsed().as_secs_f64();
    if tables.fwd.keys().next().is_some() {
        bail!("mappings left after the sweep");
    }
    Ok((secs, released as u64))
}

pub fn run(plan: &Plan, lab: &Lab, push: &mut dyn FnMut(Row)) -> anyhow::Result<()> {
    let ns = tests::netns::Netns::new(&format!("{}-sc", lab.topo.prefix));
    for &n in plan.scale_sizes {
        crate::check()?;
        let mut row = Row {
            mappings: n,
            ..Row::default()
        };
        agent_side(lab, n, &mut row).with_context(|| format!("agent with {n} mappings"))?;
        crate::check()?;
        let (secs, swept) = in_netns(&ns, move || sweep_side(n))
            .with_context(|| format!("sweeping {n} mappings"))?;
        row.sweep_secs = secs;
        row.swept = swept;
        say(format_args!(
            "  {n} mappings: tables {:.1} MiB (all maps {:.1} MiB), agent RSS {} -> {} KiB, full pass at start {:.2} s, idle CPU {:.3} cores, status {:.2} s, sweep {:.2} s ({} released)",
            row.tables_bytes as f64 / 1048576.0,
            row.all_maps_bytes as f64 / 1048576.0,
            row.rss_start_kib,
            row.rss_full_kib,
            row.full_pass_secs,
            row.idle_cpu,
            row.status_secs,
            row.sweep_secs,
            row.swept
        ));
        push(row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_full_pass_line() {
        let log = "[INFO] expiry: looked at all 1000000 mappings in 2.53s (again every 253.00s; …)";
        assert_eq!(super::full_pass(log), Some((1_000_000, 2.53)));
        let log = "expiry: looked at all 0 mappings in 41.20µs (again";
        assert_eq!(super::full_pass(log).map(|f| f.0), Some(0));
        assert_eq!(
            super::full_pass("expiry: looked at all 10000 mappings in 25.10ms (")
                .unwrap()
                .1,
            0.0251
        );
    }
}
