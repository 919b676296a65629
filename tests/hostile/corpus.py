"""Rendering reader results as text, for the XML and lease corpora.

A corpus case's expected file is exactly what these functions print for it
(`{file}` stands for the input's path), so a reviewer reads the verdict on
each broken input as plain text next to the input itself.
"""

from __future__ import annotations

import os

from vnethook import libvirt

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(os.path.dirname(HERE), "corpus")
XML_DIR = os.path.join(CORPUS, "xml")
LEASE_DIR = os.path.join(CORPUS, "leases")
# The lease corpus is read as of this moment (2026-01-01T00:00:00Z).
LEASE_NOW = 1767225600


def describe_xml(path: str) -> str:
    kind = os.path.basename(path).split("-", 1)[0]
    with open(path, "rb") as f:
        data = f.read()
    try:
        if kind == "domain":
            return _domain(libvirt.parse_domain(data, source=path))
        if kind == "network":
            return _network(libvirt.parse_network(data, source=path))
        if kind == "port":
            return _port(libvirt.parse_port(data, source=path))
    except libvirt.LibvirtDataError as e:
        return f"error: {e}"
    raise ValueError(f"{path}: unknown corpus kind {kind!r}")


def _domain(d) -> str:
    lines = [f"domain {d.name!r} uuid={d.uuid}"]
    for i in d.interfaces:
        lines.append(f"  nic {i.mac} type={i.type} network={i.network} bridge={i.bridge} target={i.target}")
    if not d.interfaces:
        lines.append("  no usable interfaces")
    return "\n".join(lines)


def _network(n) -> str:
    lines = [f"network {n.name!r} bridge={n.bridge} forward={n.forward_mode}"]
    for s in n.subnets:
        lines.append(f"  subnet ipv{s.family} {s.cidr} host={s.address}")
    for mac, ip in n.dhcp_hosts:
        lines.append(f"  host {mac} {ip}")
    return "\n".join(lines)


def _port(p) -> str:
    if p is None:
        return "no port"
    return f"port on {p.network!r}: owner={p.owner!r} mac={p.mac} bridge={p.bridge}"


def describe_leases(path: str, macs=("52:54:00:e2:00:01", "52:54:00:e2:00:02")) -> str:
    """The readable leases, then the plan's verdict for two known NICs."""
    from vnethook.config import GuestConfig, PortRule
    from vnethook.plan import plan_guest

    try:
        leases = libvirt.read_leases(path, now=LEASE_NOW)
    except libvirt.LibvirtDataError as e:
        return f"error: {e}"
    lines = [f"lease {l.ip} {l.mac} expiry={l.expiry} hostname={l.hostname}" for l in leases] or ["no leases"]
    net = libvirt.Network(
        name="vnhnet", bridge="vnhbr0", forward_mode="nat",
        subnets=(libvirt.Subnet(4, "192.0.2.1", 24, "192.0.2.0/24"),
                 libvirt.Subnet(6, "2001:db8:1::1", 64, "2001:db8:1::/64")),
        dhcp_hosts=())
    rule = PortRule(protocol="tcp", host_address=None, host_ports=(8080, 8080), guest_ports=(80, 80),
                    sources=(), origin="map:1")
    for mac in macs:
        dom = libvirt.Domain("web", None, (libvirt.Interface(mac, "network", "vnhnet", "vnhbr0", "vnet0", None),))
        guest = GuestConfig(name="web", addresses=(), interface=None, allow_outside_network=False,
                            forwards=(rule,), origin="map:1")
        plan = plan_guest(guest, dom, {"vnhnet": net}, {"vnhbr0": leases}, now=LEASE_NOW)
        got = ", ".join(f"{a} ({how})" for _, a, how in plan.addresses) or "no address"
        lines.append(f"plan {mac}: {got}; {len(plan.forwards)} forward(s)"
                     + (f"; waiting: {'; '.join(plan.waiting)}" if plan.waiting else ""))
    return "\n".join(lines)
