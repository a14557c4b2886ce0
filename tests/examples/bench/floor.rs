//! What the operations a translation is made of cost *alone* on this machine: the floor under
//! the datapath rows, measured exactly as they are (one `BPF_PROG_TEST_RUN` per sample, the
//! kernel's per-run time, the same clock cost subtracted).
//!
//! The programs are a few dozen hand-assembled instructions each, loaded with the `bpf` syscall
//! (nothing attached), on hash tables created the way snat's `SNAT_FWD` and `SNAT_REV` are
//! (preallocated, a million entries, 16-byte keys, 64- and 40-byte values) and filled with
//! 32,768 entries (one full port range's worth, as in the datapath rows). Each does only what
//! its name says: a hash lookup that hits, one or two inserts of a fresh key, the three helper
//! calls of an established packet's rewrite (two `bpf_l4_csum_replace`, one
//! `bpf_skb_store_bytes`), and their sums — an established packet (lookup + rewrite) and a new
//! mapping (a lookup that misses, two inserts, the rewrite). None of them parses more than it
//! needs, counts, or decides anything, so no design that keeps a mapping in hash tables and
//! rewrites with helpers can cost less per packet here than these rows.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use anyhow::{bail, Context as _};
use tests::packets::{self, ACK};

use crate::datapath::{Row, NAT, POD, REMOTE};

/// `BPF_MAP_TYPE_HASH`, `BPF_PROG_TYPE_SCHED_CLS` and the commands used.
const MAP_TYPE_HASH: u32 = 1;
const PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_MAP_CREATE: i32 = 0;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_PROG_LOAD: i32 = 5;
const BPF_PROG_TEST_RUN: i32 = 10;
/// Helper numbers (`enum bpf_func_id`).
const FN_MAP_LOOKUP: i32 = 1;
const FN_MAP_UPDATE: i32 = 2;
const FN_SKB_STORE_BYTES: i32 = 9;
const FN_L4_CSUM_REPLACE: i32 = 11;
/// `TC_ACT_OK` (the program did all it was told to) and `TC_ACT_SHOT` (it could not).
const OK: u32 = 0;
const FAILED: u32 = 2;

/// The tables: as `snat run` creates SNAT_FWD and SNAT_REV by default.
const MAX_ENTRIES: u32 = snat_common::DEFAULT_MAX_MAPPINGS;
const KEY: u32 = 16;
const FWD_VALUE: u32 = 64;
const REV_VALUE: u32 = 40;
/// Entries in each table while timing (a full 32,768-port range's worth of mappings).
const FILL: u32 = 32_768;

/// `union bpf_attr` as `BPF_MAP_CREATE` reads it.
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` as `BPF_MAP_*_ELEM` read it.
#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` as `BPF_PROG_LOAD` reads it (the fields up to the log).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// `union bpf_attr` as `BPF_PROG_TEST_RUN` reads it (no context, no flags).
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

/// `bpf(cmd, attr)`: the new file descriptor or 0 on success.
fn bpf<T>(cmd: i32, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid for its
    // whole size; the kernel reads (and for BPF_PROG_TEST_RUN writes) only that many bytes, and
    // every pointer in it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as u32,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn hash_table(value_size: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type: MAP_TYPE_HASH,
        key_size: KEY,
        value_size,
        max_entries: MAX_ENTRIES,
        map_flags: 0,
    };
    Ok(owned(
        bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")?,
    ))
}

fn update(map: &OwnedFd, key: &[u8; KEY as usize], value: &[u8]) -> std::io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..MapElem::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn delete(map: &OwnedFd, key: &[u8; KEY as usize]) -> std::io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..MapElem::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// A tiny eBPF assembler: the instructions the floor programs need, and jumps to one exit that
/// reports failure.
#[derive(Default)]
struct Asm {
    insns: Vec<[u8; 8]>,
    /// Indices of jumps to the failure exit, patched by `finish`.
    to_fail: Vec<usize>,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;
const R10: u8 = 10;

/// Stack layout (offsets from r10): the key, the value an insert writes, the rewrite's bytes.
const STACK_KEY: i16 = -16;
const STACK_VALUE: i16 = -88;
const STACK_BYTES: i16 = -104;

impl Asm {
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        let mut i = [0u8; 8];
        i[0] = code;
        i[1] = (src << 4) | dst;
        i[2..4].copy_from_slice(&off.to_le_bytes());
        i[4..8].copy_from_slice(&imm.to_le_bytes());
        self.insns.push(i);
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0xb7, dst, 0, 0, imm);
    }
    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.raw(0xbf, dst, src, 0, 0);
    }
    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0x07, dst, 0, 0, imm);
    }
    /// `dst = r10 + off`: a pointer into the stack.
    fn stack_ptr(&mut self, dst: u8, off: i16) {
        self.mov_reg(dst, R10);
        self.add_imm(dst, i32::from(off));
    }
    fn load_u32(&mut self, dst: u8, src: u8, off: i16) {
        self.raw(0x61, dst, src, off, 0);
    }
    fn load_u64(&mut self, dst: u8, src: u8, off: i16) {
        self.raw(0x79, dst, src, off, 0);
    }
    fn store_u64(&mut self, dst: u8, off: i16, src: u8) {
        self.raw(0x7b, dst, src, off, 0);
    }
    fn store_zero_u64(&mut self, dst: u8, off: i16) {
        self.raw(0x7a, dst, 0, off, 0);
    }
    fn map_fd(&mut self, dst: u8, map: &OwnedFd) {
        // `BPF_LD | BPF_IMM | BPF_DW` with `BPF_PSEUDO_MAP_FD`: two slots.
        self.raw(0x18, dst, 1, 0, map.as_raw_fd());
        self.raw(0, 0, 0, 0, 0);
    }
    fn call(&mut self, helper: i32) {
        self.raw(0x85, 0, 0, 0, helper);
    }
    /// Jumps to the failure exit: `if dst > src` (`BPF_JGT | BPF_X`).
    fn fail_if_greater(&mut self, dst: u8, src: u8) {
        self.to_fail.push(self.insns.len());
        self.raw(0x2d, dst, src, 0, 0);
    }
    /// Jumps to the failure exit `if r0 == 0` (`BPF_JEQ | BPF_K`).
    fn fail_if_r0_zero(&mut self) {
        self.to_fail.push(self.insns.len());
        self.raw(0x15, R0, 0, 0, 0);
    }
    /// Jumps to the failure exit `if r0 != 0` (`BPF_JNE | BPF_K`).
    fn fail_if_r0_nonzero(&mut self) {
        self.to_fail.push(self.insns.len());
        self.raw(0x55, R0, 0, 0, 0);
    }
    fn exit_with(&mut self, verdict: u32) {
        self.mov_imm(R0, verdict as i32);
        self.raw(0x95, 0, 0, 0, 0);
    }

    /// The start of every program: the context in r6, the frame's bytes 26..42 (the IPv4
    /// addresses, the ports and the sequence number) copied to the stack as the key.
    fn prologue(&mut self) {
        self.mov_reg(R6, R1);
        self.load_u32(R2, R6, 76); // skb->data
        self.load_u32(R3, R6, 80); // skb->data_end
        self.mov_reg(R4, R2);
        self.add_imm(R4, 42);
        self.fail_if_greater(R4, R3);
        self.load_u64(R5, R2, 26);
        self.store_u64(R10, STACK_KEY, R5);
        self.load_u64(R5, R2, 34);
        self.store_u64(R10, STACK_KEY + 8, R5);
    }
    /// `bpf_map_lookup_elem(map, key)`; with `must_hit`, a miss fails the program.
    fn lookup(&mut self, map: &OwnedFd, must_hit: bool) {
        self.map_fd(R1, map);
        self.stack_ptr(R2, STACK_KEY);
        self.call(FN_MAP_LOOKUP);
        if must_hit {
            self.fail_if_r0_zero();
        }
    }
    /// `bpf_map_update_elem(map, key, zeroes, BPF_NOEXIST)`, which must succeed.
    fn insert(&mut self, map: &OwnedFd, value_size: u32) {
        for i in 0..value_size.div_ceil(8) as i16 {
            self.store_zero_u64(R10, STACK_VALUE + 8 * i);
        }
        self.map_fd(R1, map);
        self.stack_ptr(R2, STACK_KEY);
        self.stack_ptr(R3, STACK_VALUE);
        self.mov_imm(R4, 1); // BPF_NOEXIST
        self.call(FN_MAP_UPDATE);
        self.fail_if_r0_nonzero();
    }
    /// An established TCP packet's rewrite as snat's does it: the address and the port into
    /// the TCP checksum (`bpf_l4_csum_replace`, pseudo-header for the address), then the IPv4
    /// header's bytes 10..24 written at once (`bpf_skb_store_bytes`).
    fn rewrite(&mut self) {
        let from = u32::from_be_bytes(POD.octets()) as i32;
        let to = u32::from_be_bytes(NAT.octets()) as i32;
        for (old, new, flags) in [(from, to, 0x10 | 4), (1000, 40000, 2)] {
            self.mov_reg(R1, R6);
            self.mov_imm(R2, 14 + 20 + 16);
            self.mov_imm(R3, old);
            self.mov_imm(R4, new);
            self.mov_imm(R5, flags);
            self.call(FN_L4_CSUM_REPLACE);
            self.fail_if_r0_nonzero();
        }
        self.store_zero_u64(R10, STACK_BYTES);
        self.store_zero_u64(R10, STACK_BYTES + 8);
        self.mov_reg(R1, R6);
        self.mov_imm(R2, 14 + 10);
        self.stack_ptr(R3, STACK_BYTES);
        self.mov_imm(R4, 14);
        self.mov_imm(R5, 0);
        self.call(FN_SKB_STORE_BYTES);
        self.fail_if_r0_nonzero();
    }
    /// `TC_ACT_OK`, then the failure exit every failed check jumps to.
    fn finish(mut self) -> Vec<[u8; 8]> {
        self.exit_with(OK);
        let fail = self.insns.len();
        self.exit_with(FAILED);
        for at in std::mem::take(&mut self.to_fail) {
            let off = (fail - at - 1) as i16;
            self.insns[at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        self.insns
    }
}

fn load(name: &str, insns: &[[u8; 8]]) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoad {
        prog_type: PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "loading the floor program {name:?}: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// One run of `prog` on `frame`: (verdict, ns).
fn run(prog: &OwnedFd, frame: &[u8], out: &mut [u8]) -> anyhow::Result<(u32, f64)> {
    let mut attr = TestRun {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRun::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN of a floor program")?;
    Ok((attr.retval, f64::from(attr.duration)))
}

/// The key the programs copy from `frame` (its bytes 26..42).
fn key_of(frame: &[u8]) -> [u8; KEY as usize] {
    let mut k = [0u8; KEY as usize];
    k.copy_from_slice(&frame[26..42]);
    k
}

/// The two floors that bound a datapath row with a target (the report pairs them by name).
pub const ESTABLISHED: &str = "floor: an established packet (lookup + rewrite)";
pub const NEW_MAPPING: &str = "floor: a new mapping (lookup that misses, two inserts, rewrite)";

/// The floor rows, `n` samples each, `overhead` (the clock's cost, from the datapath rows)
/// subtracted in `net`.
pub fn measure(n: usize, overhead: f64) -> anyhow::Result<Vec<Row>> {
    let fwd = hash_table(FWD_VALUE)?;
    let rev = hash_table(REV_VALUE)?;
    // Fill both tables with other pods' flows (keys no sample uses).
    for i in 0..FILL {
        let src = std::net::Ipv4Addr::from(u32::from_be_bytes([10, 2, 0, 0]) + i);
        let frame = packets::tcp((src, 1000), (REMOTE, 80), ACK, b"");
        let key = key_of(&frame);
        update(&fwd, &key, &[0u8; FWD_VALUE as usize]).context("filling the forward table")?;
        update(&rev, &key, &[0u8; REV_VALUE as usize]).context("filling the reverse table")?;
    }
    // The established flow's key, in the forward table.
    let established = packets::tcp((POD, 1000), (REMOTE, 80), ACK, b"");
    update(&fwd, &key_of(&established), &[0u8; FWD_VALUE as usize])?;

    let program = |f: &dyn Fn(&mut Asm)| {
        let mut a = Asm::default();
        a.prologue();
        f(&mut a);
        a.finish()
    };
    // (name, program, whether each sample inserts a fresh key)
    let programs: [(&str, Vec<[u8; 8]>, bool); 6] = [
        (
            "floor: the key copied, nothing else",
            program(&|_| {}),
            false,
        ),
        (
            "floor: one hash lookup that hits (1 M-entry table)",
            program(&|a| a.lookup(&fwd, true)),
            false,
        ),
        (
            "floor: the rewrite's three helper calls",
            program(&|a| a.rewrite()),
            false,
        ),
        (
            ESTABLISHED,
            program(&|a| {
                a.lookup(&fwd, true);
                a.rewrite();
            }),
            false,
        ),
        (
            "floor: one insert of a fresh key (1 M-entry preallocated table)",
            program(&|a| a.insert(&fwd, FWD_VALUE)),
            true,
        ),
        (
            NEW_MAPPING,
            program(&|a| {
                a.lookup(&fwd, false);
                a.insert(&fwd, FWD_VALUE);
                a.insert(&rev, REV_VALUE);
                a.rewrite();
            }),
            true,
        ),
    ];
    let mut out = vec![0u8; 256];
    let mut rows = Vec::new();
    let mut port = 0u16;
    for (name, insns, fresh) in &programs {
        crate::check()?;
        let prog = load(name, insns)?;
        let mut ns = Vec::with_capacity(n);
        for _ in 0..n {
            let frame = if *fresh {
                // A key no table holds: a pod's fresh source port.
                port = port.wrapping_add(1).max(1);
                packets::tcp((POD, port), (REMOTE, 443), ACK, b"")
            } else {
                established.clone()
            };
            let (verdict, d) = run(&prog, &frame, &mut out)?;
            if verdict != OK {
                bail!("{name}: the program failed (verdict {verdict})");
            }
            ns.push(d);
            if *fresh {
                let key = key_of(&frame);
                delete(&fwd, &key).context("removing the sample's key")?;
                // Only the new-mapping program inserts into the reverse table.
                let _ = delete(&rev, &key);
            }
        }
        rows.push(crate::datapath::row(name, ns, overhead));
    }
    Ok(rows)
}
