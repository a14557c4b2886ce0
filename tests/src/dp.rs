//! The datapath loaded in this process for `BPF_PROG_TEST_RUN` tests: the real programs and
//! maps, configured by the real controller code from a `snat run` command line, attached
//! nowhere. Frames go in, the program's verdict and the frame it left come out.

use std::net::Ipv4Addr;

use clap::Parser as _;
use snat_common::{tcp::Phase, Counter, FlowKey};
use snat_user::{
    datapath::{Counters, Engine, Tables, XdpRun},
    settings::{
        cli::{Cli, Command},
        Interface, Settings,
    },
};

use crate::packets::Seen;

/// `TC_ACT_UNSPEC`: on to the next program or the stack.
pub const PASS: i32 = -1;
/// `TC_ACT_SHOT`.
pub const SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`.
pub const REDIRECT: i32 = 7;
/// XDP actions.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const NAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

pub struct Dp {
    pub engine: Engine,
    pub counters: Counters,
}

impl Dp {
    /// `snat run --iface test0 --internal 10.1.0.0/16 --nat-ip NAT --max-mappings 4096 <extra>`.
    pub fn new(extra: &str) -> Self {
        Self::with_max(4096, extra)
    }

    pub fn with_max(max_mappings: u32, extra: &str) -> Self {
        let settings = settings(max_mappings, extra);
        Self::from_engine(Engine::load(&settings).expect("loading the programs (are you root?)"))
    }

    /// A loaded engine, its counters taken.
    pub fn from_engine(mut engine: Engine) -> Self {
        let counters = engine.take_counters().expect("counters");
        Self { engine, counters }
    }

    pub fn egress(&self, frame: &[u8]) -> (i32, Vec<u8>) {
        self.engine
            .test_run(snat_common::PROG_EGRESS, frame)
            .expect("running egress")
    }

    /// The reply path: TC ingress, or with `$SNAT_TEST_INGRESS` naming XDP, the XDP program
    /// and then TC ingress on what XDP left it (as attached: TC leaves a frame XDP marked
    /// decided alone); the verdict in TC's terms (XDP's pass and drop as `PASS` and `SHOT`).
    pub fn ingress(&self, frame: &[u8]) -> (i32, Vec<u8>) {
        if crate::agent::test_ingress().is_some_and(|p| p.starts_with("xdp")) {
            self.ingress_xdp(frame)
        } else {
            self.ingress_tc(frame)
        }
    }

    /// TC ingress alone.
    pub fn ingress_tc(&self, frame: &[u8]) -> (i32, Vec<u8>) {
        self.engine
            .test_run(snat_common::PROG_INGRESS, frame)
            .expect("running ingress")
    }

    /// XDP, then TC ingress on what XDP left it, as attached with `--ingress xdp`.
    pub fn ingress_xdp(&self, frame: &[u8]) -> (i32, Vec<u8>) {
        let run = self.xdp(frame);
        match run.action {
            XDP_DROP => (SHOT, run.frame),
            XDP_PASS if run.decided() => (PASS, run.frame),
            XDP_PASS => self.ingress_tc(&run.frame),
            other => panic!("unexpected XDP action {other}"),
        }
    }

    /// The XDP program alone.
    pub fn xdp(&self, frame: &[u8]) -> XdpRun {
        self.engine.test_run_xdp(frame).expect("running XDP")
    }

    /// Runs `frame` through egress, expects it translated, and returns what came out.
    pub fn egress_ok(&self, frame: &[u8]) -> Seen {
        let (ret, out) = self.egress(frame);
        assert_eq!(ret, PASS, "egress verdict; counters: {:?}", self.nonzero());
        Seen::parse(&out)
    }

    pub fn ingress_ok(&self, frame: &[u8]) -> Seen {
        let (ret, out) = self.ingress(frame);
        assert_eq!(ret, PASS, "ingress verdict; counters: {:?}", self.nonzero());
        Seen::parse(&out)
    }

    pub fn count(&self, c: Counter) -> u64 {
        self.counters.read().expect("reading counters")[c.index() as usize].1
    }

    pub fn nonzero(&self) -> Vec<(Counter, u64)> {
        self.counters
            .read()
            .expect("reading counters")
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// The settings of `snat run --iface test0 --internal 10.1.0.0/16 --nat-ip NAT --max-mappings
/// <max_mappings> <extra>`.
pub fn settings(max_mappings: u32, extra: &str) -> Settings {
    let line = format!("snat run --iface test0 --internal 10.1.0.0/16 --nat-ip {NAT} --max-mappings {max_mappings} {extra}");
    let Command::Run(args) = Cli::try_parse_from(line.split_whitespace())
        .expect("a valid command line")
        .command
    else {
        unreachable!("a run command line")
    };
    let iface = Interface {
        name: "test0".into(),
        index: 0,
        ipv4: vec![],
        ipv6: vec![],
    };
    Settings::validate(&args, iface).expect("valid settings")
}

/// The TCP phase of the mapping of the forward key `key`, from both halves as the tables hold
/// them.
pub fn phase(tables: &Tables, key: &FlowKey) -> Phase {
    let m = tables.fwd.get(key, 0).expect("a forward half");
    let o = tables
        .rev
        .get(&key.reply(m.nat_addr, m.nat_port), 0)
        .expect("a reverse half");
    Phase::of_halves(&m, &o)
}
