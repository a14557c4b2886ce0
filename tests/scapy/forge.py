#!/usr/bin/env python3
"""Sends one crafted IPv4 packet at layer 2 with scapy, for tests that need a packet no socket
would send (a spoofed source, a chosen TTL, sequence number or ICMP quote).

Usage: forge.py IFACE DST_MAC KIND ARGS_JSON

KIND and the ARGS_JSON fields it reads:
  udp          src dst sport dport [ttl] [payload]
  tcp          src dst sport dport flags seq [ack] [window]
  frag_needed  src dst mtu quote   ICMP "fragmentation needed" (type 3 code 4) quoting
                                   quote = {src dst proto ("tcp"|"udp") sport dport [seq]}

Every packet is built whole (scapy fills lengths and checksums) and sent once on IFACE to
DST_MAC, so nothing on the sending side routes, fixes or fragments it. Prints "sent" when done.
"""
import json
import sys

from scapy.all import ICMP, IP, TCP, UDP, Ether, Raw, conf, sendp

conf.verb = 0


def quoted(q):
    ip = IP(src=q["src"], dst=q["dst"])
    if q["proto"] == "tcp":
        return ip / TCP(sport=q["sport"], dport=q["dport"], seq=q.get("seq", 0), flags="A")
    return ip / UDP(sport=q["sport"], dport=q["dport"]) / Raw(b"quoted")


def build(kind, a):
    ip = IP(src=a["src"], dst=a["dst"], ttl=a.get("ttl", 64))
    if kind == "udp":
        return ip / UDP(sport=a["sport"], dport=a["dport"]) / Raw(a.get("payload", "forged").encode())
    if kind == "tcp":
        return ip / TCP(sport=a["sport"], dport=a["dport"], flags=a["flags"], seq=a["seq"],
                        ack=a.get("ack", 0), window=a.get("window", 502))
    if kind == "frag_needed":
        return ip / ICMP(type=3, code=4, nexthopmtu=a["mtu"]) / quoted(a["quote"])
    raise SystemExit(f"forge.py: unknown kind {kind!r}: use udp, tcp or frag_needed")


def main():
    iface, mac, kind, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    sendp(Ether(dst=mac) / build(kind, args), iface=iface)
    print("sent", flush=True)


if __name__ == "__main__":
    main()
