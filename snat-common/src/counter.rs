//! Indices of the per-CPU counters the datapath bumps for every packet it sees.
//!
//! Every packet either program handles ends in exactly one "result" counter (translated, passed
//! for a reason, or dropped for a reason); allocation events are counted on top. The controller
//! sums each index over all CPUs and names it with [`Counter::labels`].

/// One counter slot in `SNAT_COUNTERS`. The discriminant is the array index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    // Egress results: exactly one per packet seen on egress.
    EgressTranslatedTcp,
    EgressTranslatedUdp,
    EgressTranslatedIcmp,
    EgressTranslatedIcmpError,
    /// A later fragment (no L4 header) whose source was translated like its first fragment.
    EgressTranslatedFragment,
    EgressPassNotIpv4,
    EgressPassNotInternal,
    EgressPassExcluded,
    EgressDropMalformed,
    EgressDropFragment,
    EgressDropUnsupportedProto,
    EgressDropIcmpType,
    /// An internal IPv6 packet whose extension headers snat does not walk (ESP, AH, a routing
    /// header with segments left, too many headers): its ports cannot be found, so it cannot
    /// leave translated.
    EgressDropExtHeaders,
    EgressDropTcpNotSyn,
    EgressDropIcmpErrorNoMapping,
    EgressDropNoNatIp,
    EgressDropExhaustedTcp,
    EgressDropExhaustedUdp,
    EgressDropExhaustedIcmp,
    EgressDropTableFull,
    EgressDropRewrite,
    EgressDropSourceCap,
    EgressDropFairShare,
    /// A pod's ICMP error quoting a flow that is not its own (the quoted destination is not the
    /// error's source).
    EgressDropIcmpErrorForeign,
    /// An ICMP error from the node (any non-internal source) about a reply it had received for a
    /// pod: the quote was translated to the NAT endpoint.
    EgressTranslatedNodeIcmpError,
    /// An ICMP error from the node quoting an internal address snat has no mapping for: dropped,
    /// so no internal address leaves inside a quote.
    EgressDropNodeIcmpErrorNoMapping,
    /// The packet's mapping was being released at that instant (it had been idle for its whole
    /// timeout): dropped, as if it had come a moment later.
    EgressDropReleased,
    /// The allocation program could not be reached (not loaded into `SNAT_PROGRAMS`).
    EgressDropNoAllocator,
    // Ingress results: exactly one per packet seen on ingress.
    IngressTranslatedTcp,
    IngressTranslatedUdp,
    IngressTranslatedIcmp,
    IngressTranslatedIcmpError,
    IngressTranslatedFragment,
    IngressPassNotIpv4,
    IngressPassNoMapping,
    IngressPassUnparsed,
    IngressDropRewrite,
    /// A TCP RST from the remote outside the pod's window: translated and passed to the pod
    /// (whose stack answers with a challenge ACK), the mapping's state unchanged.
    IngressRstOutOfWindow,
    /// A TCP FIN from the remote outside the pod's window (see `IngressRstOutOfWindow`).
    IngressFinOutOfWindow,
    /// The reply's mapping was being released at that instant: dropped.
    IngressDropReleased,
    // Allocation events, counted besides the packet's result.
    CreatedTcp,
    CreatedUdp,
    CreatedIcmp,
    /// The new mapping took the NAT port its internal endpoint had towards another destination
    /// (endpoint-independent mapping).
    AllocSameEndpoint,
    /// The new mapping kept the pod's own source port (or echo identifier).
    AllocPreserved,
    /// The new mapping took a random port on the first tries.
    AllocRandom,
    /// The exhaustive walk of the range found the port: the random tries failed or were skipped,
    /// and the destination had no free-port index or its index had no free port marked.
    AllocScan,
    /// The destination's free-port index (built when it turned hot, searched while it exists)
    /// found the port.
    AllocIndexed,
    /// A destination became hot and its free-port index was built (one walk of the range).
    IndexBuilt,
    /// Two CPUs mapped the same new flow at once; the loser adopted the winner's mapping.
    AllocRaceLost,
    /// A new TCP SYN reopened a closed mapping and kept its NAT port (binding persistence).
    TcpReopened,
    /// A candidate port was skipped because a local socket uses it (NAT IP is the node's own), or
    /// an echo identifier because the node's own pings use it.
    AllocHostPortSkipped,
    /// A new flow was refused without a search: its destination was found full moments ago and no
    /// port of it has been released since.
    RefusedKnownFull,
    /// A new flow got its port on another NAT IP: its paired one had none towards its
    /// destination (`--ip-pooling overflow`).
    AllocOverflow,
    /// A lookup returned a map element the kernel had just recycled for another flow (its identity
    /// did not match the key looked up); it was treated as absent.
    RecycledEntry,
    // Answers to refused flows (besides the packet's drop result).
    /// A TCP RST was sent back to the pod.
    RejectRst,
    /// An ICMP destination unreachable (code 13) was sent back to the pod.
    RejectIcmp,
    /// The answer was not sent: the rate limit was reached.
    RejectRateLimited,
    /// The answer could not be built (unusual header); the packet was dropped.
    RejectFailed,
    // Cluster mode (`crate::block`): results of packets of held mappings, and allocation events.
    /// The mapping's block is not held any more, or held under another claim: dropped (the
    /// mapping is void).
    EgressDropBlockGone,
    /// The mapping's block is past its valid-until (the fence): dropped, the mapping kept.
    EgressDropBlockSuspended,
    IngressDropBlockGone,
    IngressDropBlockSuspended,
    /// A reply to a NAT IP, inside the port range, that no mapping of this node explains: dropped,
    /// not passed to the node's stack (a former owner never answers a new owner's flows).
    IngressDropNotOurs,
    /// A port was claimed in a block that closed (or went) a moment before: given back, and the
    /// flow refused as if the block had had no port.
    AllocBlockClosed,
    /// A new flow found no port while the node was claiming another block on its NAT IP: its
    /// packet was dropped without an answer (a retransmitted SYN or datagram gets the new block),
    /// the flow counted as refused once like any other.
    EgressDropAwaitingBlock,
    /// A mapping's expiry event did not fit in `SNAT_EXPIRY_EVENTS` (the controller then walks
    /// every mapping once).
    ExpiryEventsLost,
    // The XDP reply path (`--ingress xdp`): besides the packet's result (counted where it was
    // decided, in XDP or in TC).
    /// A reply whose TCP or UDP checksum may still be pending offload (a local sender's
    /// CHECKSUM_PARTIAL skb, as over a veth): left untouched by XDP for TC, whose helpers know.
    XdpDeferred,
    /// XDP could not put its mark in front of the frame (the driver gives no metadata room): left
    /// untouched for TC.
    XdpNoMetadata,
    // Hairpinning (`--hairpin on`): the second half of a pod's packet to a NAT endpoint, after
    // its source was translated (counted among the egress results).
    /// Translated to the pod whose mapping owns the NAT endpoint and sent to its interface.
    HairpinDeliveredTcp,
    HairpinDeliveredUdp,
    /// No mapping of that NAT endpoint accepts packets from this one (as a remote host would be
    /// filtered): dropped.
    HairpinDropFiltered,
    /// No route to the pod, or the redirect failed: dropped.
    HairpinDropNoRoute,
    /// The delivering program could not be reached (not in `SNAT_PROGRAMS`): dropped.
    HairpinDropNoDeliverer,
}

impl Counter {
    /// Number of counters (the size of `SNAT_COUNTERS`).
    pub const COUNT: u32 = Counter::HairpinDropNoDeliverer as u32 + 1;

    /// Every counter, in index order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::EgressTranslatedTcp,
        Counter::EgressTranslatedUdp,
        Counter::EgressTranslatedIcmp,
        Counter::EgressTranslatedIcmpError,
        Counter::EgressTranslatedFragment,
        Counter::EgressPassNotIpv4,
        Counter::EgressPassNotInternal,
        Counter::EgressPassExcluded,
        Counter::EgressDropMalformed,
        Counter::EgressDropFragment,
        Counter::EgressDropUnsupportedProto,
        Counter::EgressDropIcmpType,
        Counter::EgressDropExtHeaders,
        Counter::EgressDropTcpNotSyn,
        Counter::EgressDropIcmpErrorNoMapping,
        Counter::EgressDropNoNatIp,
        Counter::EgressDropExhaustedTcp,
        Counter::EgressDropExhaustedUdp,
        Counter::EgressDropExhaustedIcmp,
        Counter::EgressDropTableFull,
        Counter::EgressDropRewrite,
        Counter::EgressDropSourceCap,
        Counter::EgressDropFairShare,
        Counter::EgressDropIcmpErrorForeign,
        Counter::EgressTranslatedNodeIcmpError,
        Counter::EgressDropNodeIcmpErrorNoMapping,
        Counter::EgressDropReleased,
        Counter::EgressDropNoAllocator,
        Counter::IngressTranslatedTcp,
        Counter::IngressTranslatedUdp,
        Counter::IngressTranslatedIcmp,
        Counter::IngressTranslatedIcmpError,
        Counter::IngressTranslatedFragment,
        Counter::IngressPassNotIpv4,
        Counter::IngressPassNoMapping,
        Counter::IngressPassUnparsed,
        Counter::IngressDropRewrite,
        Counter::IngressRstOutOfWindow,
        Counter::IngressFinOutOfWindow,
        Counter::IngressDropReleased,
        Counter::CreatedTcp,
        Counter::CreatedUdp,
        Counter::CreatedIcmp,
        Counter::AllocSameEndpoint,
        Counter::AllocPreserved,
        Counter::AllocRandom,
        Counter::AllocScan,
        Counter::AllocIndexed,
        Counter::IndexBuilt,
        Counter::AllocRaceLost,
        Counter::TcpReopened,
        Counter::AllocHostPortSkipped,
        Counter::RefusedKnownFull,
        Counter::AllocOverflow,
        Counter::RecycledEntry,
        Counter::RejectRst,
        Counter::RejectIcmp,
        Counter::RejectRateLimited,
        Counter::RejectFailed,
        Counter::EgressDropBlockGone,
        Counter::EgressDropBlockSuspended,
        Counter::IngressDropBlockGone,
        Counter::IngressDropBlockSuspended,
        Counter::IngressDropNotOurs,
        Counter::AllocBlockClosed,
        Counter::EgressDropAwaitingBlock,
        Counter::ExpiryEventsLost,
        Counter::XdpDeferred,
        Counter::XdpNoMetadata,
        Counter::HairpinDeliveredTcp,
        Counter::HairpinDeliveredUdp,
        Counter::HairpinDropFiltered,
        Counter::HairpinDropNoRoute,
        Counter::HairpinDropNoDeliverer,
    ];

    /// The counter's index in `SNAT_COUNTERS`.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable `(group, detail)` names: group is `egress`, `ingress`, `alloc`, `reject`, `xdp` or `hairpin`; detail names the
    /// result (`translated_tcp`, `drop_exhausted_udp`, …). Metrics and the CLI print these.
    pub const fn labels(self) -> (&'static str, &'static str) {
        use Counter::*;
        match self {
            EgressTranslatedTcp => ("egress", "translated_tcp"),
            EgressTranslatedUdp => ("egress", "translated_udp"),
            EgressTranslatedIcmp => ("egress", "translated_icmp"),
            EgressTranslatedIcmpError => ("egress", "translated_icmp_error"),
            EgressTranslatedFragment => ("egress", "translated_fragment"),
            EgressPassNotIpv4 => ("egress", "pass_not_ipv4"),
            EgressPassNotInternal => ("egress", "pass_not_internal"),
            EgressPassExcluded => ("egress", "pass_excluded"),
            EgressDropMalformed => ("egress", "drop_malformed"),
            EgressDropFragment => ("egress", "drop_fragment"),
            EgressDropUnsupportedProto => ("egress", "drop_unsupported_proto"),
            EgressDropIcmpType => ("egress", "drop_icmp_type"),
            EgressDropExtHeaders => ("egress", "drop_ext_headers"),
            EgressDropTcpNotSyn => ("egress", "drop_tcp_not_syn"),
            EgressDropIcmpErrorNoMapping => ("egress", "drop_icmp_error_no_mapping"),
            EgressDropNoNatIp => ("egress", "drop_no_nat_ip"),
            EgressDropExhaustedTcp => ("egress", "drop_exhausted_tcp"),
            EgressDropExhaustedUdp => ("egress", "drop_exhausted_udp"),
            EgressDropExhaustedIcmp => ("egress", "drop_exhausted_icmp"),
            EgressDropTableFull => ("egress", "drop_table_full"),
            EgressDropRewrite => ("egress", "drop_rewrite_failed"),
            EgressDropSourceCap => ("egress", "drop_source_cap"),
            EgressDropFairShare => ("egress", "drop_fair_share"),
            EgressDropIcmpErrorForeign => ("egress", "drop_icmp_error_foreign"),
            EgressTranslatedNodeIcmpError => ("egress", "translated_node_icmp_error"),
            EgressDropNodeIcmpErrorNoMapping => ("egress", "drop_node_icmp_error_no_mapping"),
            EgressDropReleased => ("egress", "drop_released"),
            EgressDropNoAllocator => ("egress", "drop_no_allocator"),
            IngressTranslatedTcp => ("ingress", "translated_tcp"),
            IngressTranslatedUdp => ("ingress", "translated_udp"),
            IngressTranslatedIcmp => ("ingress", "translated_icmp"),
            IngressTranslatedIcmpError => ("ingress", "translated_icmp_error"),
            IngressTranslatedFragment => ("ingress", "translated_fragment"),
            IngressPassNotIpv4 => ("ingress", "pass_not_ipv4"),
            IngressPassNoMapping => ("ingress", "pass_no_mapping"),
            IngressPassUnparsed => ("ingress", "pass_unparsed"),
            IngressDropRewrite => ("ingress", "drop_rewrite_failed"),
            IngressRstOutOfWindow => ("ingress", "rst_out_of_window"),
            IngressFinOutOfWindow => ("ingress", "fin_out_of_window"),
            IngressDropReleased => ("ingress", "drop_released"),
            CreatedTcp => ("alloc", "created_tcp"),
            CreatedUdp => ("alloc", "created_udp"),
            CreatedIcmp => ("alloc", "created_icmp"),
            AllocSameEndpoint => ("alloc", "port_same_endpoint"),
            AllocPreserved => ("alloc", "port_preserved"),
            AllocRandom => ("alloc", "port_random"),
            AllocScan => ("alloc", "port_scan"),
            AllocIndexed => ("alloc", "port_index"),
            IndexBuilt => ("alloc", "index_built"),
            AllocRaceLost => ("alloc", "race_lost"),
            TcpReopened => ("alloc", "tcp_reopened"),
            AllocHostPortSkipped => ("alloc", "host_port_skipped"),
            RefusedKnownFull => ("alloc", "refused_known_full"),
            AllocOverflow => ("alloc", "overflowed"),
            RecycledEntry => ("alloc", "recycled_entry"),
            RejectRst => ("reject", "rst_sent"),
            RejectIcmp => ("reject", "icmp_sent"),
            RejectRateLimited => ("reject", "rate_limited"),
            RejectFailed => ("reject", "failed"),
            EgressDropBlockGone => ("egress", "drop_block_gone"),
            EgressDropBlockSuspended => ("egress", "drop_block_suspended"),
            IngressDropBlockGone => ("ingress", "drop_block_gone"),
            IngressDropBlockSuspended => ("ingress", "drop_block_suspended"),
            IngressDropNotOurs => ("ingress", "drop_not_ours"),
            AllocBlockClosed => ("alloc", "block_closed"),
            EgressDropAwaitingBlock => ("egress", "drop_awaiting_block"),
            ExpiryEventsLost => ("alloc", "expiry_events_lost"),
            XdpDeferred => ("xdp", "deferred_to_tc"),
            XdpNoMetadata => ("xdp", "no_metadata"),
            HairpinDeliveredTcp => ("hairpin", "delivered_tcp"),
            HairpinDeliveredUdp => ("hairpin", "delivered_udp"),
            HairpinDropFiltered => ("hairpin", "drop_filtered"),
            HairpinDropNoRoute => ("hairpin", "drop_no_route"),
            HairpinDropNoDeliverer => ("hairpin", "drop_no_deliverer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i, "{c:?}");
        }
    }

    #[test]
    fn labels_are_unique() {
        for a in Counter::ALL {
            for b in Counter::ALL {
                if a != b {
                    assert_ne!(a.labels(), b.labels());
                }
            }
        }
    }
}
