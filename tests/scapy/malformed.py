#!/usr/bin/env python3
"""Crafts snat's hostile and odd packets with scapy and sends them on one interface.

Usage: malformed.py SIDE IFACE DST_MAC ARGS_JSON

SIDE is "pod" (frames from a pod towards the node) or "internet" (frames from the router onto
the node's uplink). ARGS_JSON holds the addresses and ports the cases use. Every case is sent at
layer 2 so nothing on the sending side fixes it up, and carries a unique marker (its UDP/TCP
destination port, or its payload) so the test can find it at the far side. Prints one JSON line
per case sent: {"case": name, "marker": ...}.
"""
import json
import sys
import time

from scapy.all import (ICMP, IP, TCP, UDP, Ether, IPOption_NOP, IPOption_RR, Raw,
                       conf, sendp)

conf.verb = 0


def fix(pkt):
    """Builds the packet, letting scapy fill lengths and checksums (the cases below override
    exactly the field they break)."""
    return Ether(bytes(pkt))


def pod_cases(a):
    src, dst, nat = a["pod"], a["server"], a["nat"]
    e = Ether(dst=a["mac"])
    p = 9100
    yield "ip_options", p, fix(e / IP(src=src, dst=dst, options=[IPOption_RR(), IPOption_NOP()]) / UDP(sport=40001, dport=p) / Raw(b"options"))
    p += 1
    yield "udp_len_too_long", p, fix(e / IP(src=src, dst=dst) / UDP(sport=40002, dport=p, len=200) / Raw(b"short"))
    p += 1
    yield "udp_len_too_short", p, fix(e / IP(src=src, dst=dst) / UDP(sport=40003, dport=p, len=8) / Raw(b"longer than it says"))
    p += 1
    yield "udp_zero_checksum", p, fix(e / IP(src=src, dst=dst) / UDP(sport=40004, dport=p, chksum=0) / Raw(b"no checksum"))
    p += 1
    yield "udp_wrong_checksum", p, fix(e / IP(src=src, dst=dst) / UDP(sport=40005, dport=p, chksum=0x1234) / Raw(b"bad checksum"))
    p += 1
    yield "tcp_wrong_checksum", p, fix(e / IP(src=src, dst=dst) / TCP(sport=40006, dport=p, flags="S", chksum=0x4321))
    p += 1
    yield "tcp_doff_below_5", p, fix(e / IP(src=src, dst=dst) / TCP(sport=40007, dport=p, flags="S", dataofs=4))
    p += 1
    yield "udp_source_port_0", p, fix(e / IP(src=src, dst=dst) / UDP(sport=0, dport=p) / Raw(b"port zero"))
    p += 1
    yield "unknown_protocol", p, fix(e / IP(src=src, dst=dst, proto=253) / Raw(p.to_bytes(2, "big") + b"experimental"))
    p += 1
    yield "tiny_udp_no_header", p, fix(e / IP(src=src, dst=dst, proto=17, id=p))
    p += 1
    yield "tcp_not_syn", p, fix(e / IP(src=src, dst=dst) / TCP(sport=40011, dport=p, flags="A"))
    p += 1
    bad = bytearray(bytes(fix(e / IP(src=src, dst=dst) / UDP(sport=40012, dport=p) / Raw(b"bad ip checksum"))))
    bad[14 + 10] ^= 0xff
    yield "ip_bad_header_checksum", p, Ether(bytes(bad))
    p += 1
    big = bytearray(bytes(fix(e / IP(src=src, dst=dst) / UDP(sport=40013, dport=p) / Raw(b"total length lies"))))
    big[14 + 2:14 + 4] = (1400).to_bytes(2, "big")
    yield "ip_total_length_too_long", p, Ether(bytes(big))
    p += 1
    yield "icmp_echo_reply_from_pod", p, fix(e / IP(src=src, dst=dst) / ICMP(type=0, id=p))
    p += 1
    # An ICMP error quoting something snat never saw.
    yield "icmp_error_unknown_flow", p, fix(e / IP(src=src, dst=dst) / ICMP(type=3, code=3) / IP(src=dst, dst=src) / UDP(sport=p, dport=5))


def internet_cases(a):
    src, nat, pod = a["server"], a["nat"], a["pod"]
    e = Ether(dst=a["mac"])
    flow = a["flow"]  # a live UDP mapping: NAT port, the server port it talks to
    p = 9200
    quoted = IP(src=nat, dst=src) / UDP(sport=flow["nat_port"], dport=flow["server_port"])
    yield "icmp_error_truncated_inner", p, fix(e / IP(src=src, dst=nat, id=p) / ICMP(type=3, code=3) / Raw(bytes(quoted)[:10]))
    p += 1
    nested = IP(src=nat, dst=src) / ICMP(type=3, code=3) / quoted
    yield "icmp_error_nested", p, fix(e / IP(src=src, dst=nat, id=p) / ICMP(type=11, code=0) / nested)
    p += 1
    yield "icmp_error_inner_not_ipv4", p, fix(e / IP(src=src, dst=nat, id=p) / ICMP(type=3, code=3) / Raw(b"\x60" + bytes(27)))
    p += 1
    yield "tiny_udp_no_header", p, fix(e / IP(src=src, dst=nat, proto=17, id=p))
    p += 1
    yield "tcp_doff_below_5", p, fix(e / IP(src=src, dst=nat, id=p) / TCP(sport=80, dport=flow["nat_port"], flags="SA", dataofs=4))
    p += 1
    yield "unknown_protocol", p, fix(e / IP(src=src, dst=nat, proto=253, id=p) / Raw(b"experimental"))
    p += 1
    yield "ip_options_reply", p, fix(e / IP(src=src, dst=nat, options=[IPOption_NOP()] * 4) / UDP(sport=flow["server_port"], dport=flow["nat_port"]) / Raw(b"reply with options"))
    p += 1
    yield "udp_wrong_checksum_reply", p, fix(e / IP(src=src, dst=nat) / UDP(sport=flow["server_port"], dport=flow["nat_port"], chksum=0x1111) / Raw(b"bad reply checksum"))


def main():
    side, iface, mac, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    args["mac"] = mac
    cases = pod_cases(args) if side == "pod" else internet_cases(args)
    for name, marker, pkt in cases:
        sendp(pkt, iface=iface)
        print(json.dumps({"case": name, "marker": marker}), flush=True)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
