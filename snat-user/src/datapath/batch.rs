//! Reading whole hash maps in batches (`BPF_MAP_LOOKUP_BATCH`): one syscall per few thousand
//! entries instead of two per entry (`get_next_key`, then `lookup`), which is what aya's
//! iterators do. The expiry pass walks every mapping every `--gc-interval`, so at a million
//! mappings that is the difference between most of a core and a small fraction of one.
//!
//! Kernels without batch operations on hash maps (before 5.6) get aya's iteration instead. Like
//! any walk of a live hash map, a batch walk may miss entries inserted into buckets it has
//! passed; unlike `get_next_key`, which starts over when the entry it stands on is deleted, it
//! never returns an entry twice.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use super::error::{DatapathError, Doing as _};
use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    Pod,
};

/// `union bpf_attr`'s member for `BPF_MAP_*_BATCH` commands (`include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call; grown when one hash bucket holds more (`ENOSPC`).
const FIRST_BATCH: usize = 4096;
const MAX_BATCH: usize = 1 << 20;
/// The kernel's `ENOTSUPP` (not in libc): the map type has no batch operations.
const ENOTSUPP: i32 = 524;

/// Calls `f` with every entry of `map`, in batches when the kernel can. Meant for maps with small
/// values: a batch buffers thousands of them.
pub fn for_each<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut f: impl FnMut(K, V),
) -> Result<(), DatapathError> {
    match walk(map, &mut f) {
        Ok(()) => Ok(()),
        // Before anything was read: iterate instead.
        Err(Walk::Unsupported) => {
            for item in map.iter() {
                let (k, v) = item.doing(|| "reading a map entry".into())?;
                f(k, v);
            }
            Ok(())
        }
        Err(Walk::Failed(e)) => Err(e).doing(|| "BPF_MAP_LOOKUP_BATCH".into()),
    }
}

/// Every key of `map`.
pub fn keys<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<K>, DatapathError> {
    let mut keys = Vec::new();
    for_each(map, |k, _| keys.push(k))?;
    Ok(keys)
}

enum Walk {
    /// The kernel has no batch lookup for this map (found on the first call: nothing read).
    Unsupported,
    Failed(io::Error),
}

fn walk<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    f: &mut impl FnMut(K, V),
) -> Result<(), Walk> {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut batch = FIRST_BATCH;
    let mut keys = vec![0u8; batch * size_of::<K>()];
    let mut values = vec![0u8; batch * size_of::<V>()];
    // The kernel's cursor for hash maps is a bucket index (a u32); room for a key is safe for
    // every map type.
    let token_len = size_of::<K>().max(size_of::<u64>());
    let (mut token_in, mut token_out) = (vec![0u8; token_len], vec![0u8; token_len]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` batch member of the size passed; the buffers it
        // points to hold `count` keys and values and a cursor of at least a key's size, and
        // outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        let errno = err.as_ref().and_then(io::Error::raw_os_error);
        if matches!(errno, Some(libc::ENOSPC)) && batch < MAX_BATCH {
            // One bucket holds more entries than asked for: ask for more (nothing was copied).
            batch *= 2;
            keys.resize(batch * size_of::<K>(), 0);
            values.resize(batch * size_of::<V>(), 0);
            continue;
        }
        // ENOENT: the end (the entries of this last call are still filled in).
        let done = matches!(errno, Some(libc::ENOENT));
        if let Some(e) = err.filter(|_| !done) {
            if first && matches!(errno, Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)) {
                return Err(Walk::Unsupported);
            }
            return Err(Walk::Failed(e));
        }
        for i in 0..attr.count as usize {
            // SAFETY: the kernel filled `count` keys and values; each read is of a plain-data
            // (`Pod`) type from within the buffers, unaligned-safe.
            let (k, v) = unsafe {
                (
                    keys.as_ptr()
                        .add(i * size_of::<K>())
                        .cast::<K>()
                        .read_unaligned(),
                    values
                        .as_ptr()
                        .add(i * size_of::<V>())
                        .cast::<V>()
                        .read_unaligned(),
                )
            };
            f(k, v);
        }
        if done {
            return Ok(());
        }
        std::mem::swap(&mut token_in, &mut token_out);
        first = false;
    }
}
