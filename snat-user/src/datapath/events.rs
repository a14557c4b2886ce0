//! The datapath's expiry events (`SNAT_EXPIRY_EVENTS`): forward keys of mappings whose expiry may
//! have come closer (new, or a TCP phase that can have a shorter timeout). The controller drains
//! the ring every `--gc-interval` instead of walking every mapping; what did not fit is counted
//! (`Counter::ExpiryEventsLost`), and the controller then walks them all once.

use aya::maps::{MapData, RingBuf};
use snat_common::{FlowKey, FlowKey6};

/// Size of the ring for `max_mappings` mappings: 4 bytes a mapping (a record is 24: at 1 M
/// mappings 4 MiB, 170,000 events between two reads, twice what 20,000 new connections a second
/// send with their SYN-ACKs and FINs), a power of two from 256 KiB to 16 MiB (the kernel wants a
/// power of two of pages).
pub fn ring_bytes(max_mappings: u32) -> u32 {
    (u64::from(max_mappings) * 4)
        .next_power_of_two()
        .clamp(256 << 10, 16 << 20) as u32
}

/// The controller's end of the ring.
pub struct ExpiryEvents {
    ring: RingBuf<MapData>,
}

impl ExpiryEvents {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Every key the ring holds now (a few hundred thousand at most: the ring's size), IPv4
    /// and IPv6 apart (a record's size tells them apart: 16 or 40 bytes).
    pub fn drain(&mut self) -> (Vec<FlowKey>, Vec<FlowKey6>) {
        let (mut keys, mut keys6) = (Vec::new(), Vec::new());
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<FlowKey6>() {
                keys6.push(bytemuck::pod_read_unaligned(&item[..size_of::<FlowKey6>()]));
            } else if let Some(bytes) = item.get(..size_of::<FlowKey>()) {
                keys.push(bytemuck::pod_read_unaligned(bytes));
            }
        }
        (keys, keys6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_are_powers_of_two_within_bounds() {
        assert_eq!(ring_bytes(1), 256 << 10);
        assert_eq!(ring_bytes(1_000_000), 4 << 20);
        assert_eq!(ring_bytes(1 << 24), 16 << 20);
        for n in [1, 4096, 65536, 1_000_000, 1 << 24] {
            assert!(ring_bytes(n).is_power_of_two(), "{n}");
        }
    }
}
