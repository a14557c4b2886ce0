//! The two clocks the agent reads, in nanoseconds: `CLOCK_MONOTONIC_COARSE`, which the datapath
//! stamps mappings with (`bpf_ktime_get_coarse_ns`), and `CLOCK_BOOTTIME`, which cluster mode's
//! fence runs on (`bpf_ktime_get_boot_ns`: it keeps counting while the machine sleeps).

fn read(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC_COARSE`: the clock the datapath stamps mappings with.
pub fn monotonic_coarse_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

/// `CLOCK_BOOTTIME`: the clock of cluster mode's leases and valid-until.
pub fn boottime_ns() -> u64 {
    read(libc::CLOCK_BOOTTIME)
}
