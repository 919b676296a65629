"""The plan: which forwards a guest should have, as a pure function.

Everything the decision needs is passed in (the guest's config entry, the
domain as libvirt describes it, its networks, the leases seen), so the plan
is deterministic, has no side effects, and is unit-testable with captured
fixtures. Reading files and changing the firewall happen elsewhere.

When an address cannot be resolved yet (a freshly booted guest has no
lease at `started`), the plan says so in `waiting` instead of failing, so
the caller can arrange to come back when the lease appears.
"""

from __future__ import annotations

from vnethook.model import Forward


class Plan:
    """The outcome for one guest (a plain class: dataclasses are a costly import on the hook's path)."""

    __slots__ = ("domain", "forwards", "waiting", "errors", "addresses", "pending")

    def __init__(self, domain, forwards=(), waiting=(), errors=(), addresses=(), pending=()):
        self.domain = domain
        self.forwards = tuple(forwards)  # Forward, ...
        self.waiting = tuple(waiting)  # why some forwards cannot be placed yet
        self.errors = tuple(errors)  # config that cannot be honoured (never retried)
        self.addresses = tuple(addresses)  # (mac, address, where it came from)
        self.pending = tuple(pending)  # (config.PortRule, family, why): not placed yet

    def to_dict(self) -> dict:
        return {
            "domain": self.domain,
            "forwards": [f.to_dict() for f in self.forwards],
            "waiting": list(self.waiting),
            "errors": list(self.errors),
            "addresses": [list(a) for a in self.addresses],
            "pending": [{"forward": describe_rule(r, fam), "origin": r.origin, "why": why}
                        for r, fam, why in self.pending],
        }


def describe_rule(rule, family) -> str:
    """A map entry as the forwards it would make are described, guest side unknown."""
    lo, hi = rule.host_ports
    glo, ghi = rule.guest_ports
    hp = f"{lo}" if lo == hi else f"{lo}-{hi}"
    gp = f"{glo}" if glo == ghi else f"{glo}-{ghi}"
    if rule.host_address:
        host = f"[{rule.host_address}]" if family == 6 else rule.host_address
    else:
        host = "*" if family == 4 else "[*]"
    src = f" from {','.join(rule.sources)}" if rule.sources else ""
    return f"{host}:{hp} -> ?:{gp}/{rule.protocol}{src}"


def _all_pending(guest, why):
    out = []
    for r in guest.forwards:
        fams = [_family(r.host_address)] if r.host_address else [4]
        out += [(r, fam, why) for fam in fams]
    return tuple(out)


def _family(text: str) -> int:
    from vnethook import addr

    return addr.family(text)


def _pick_nic(guest, domain):
    """Choose the NIC the forwards point at, or say why none fits."""
    nics = [i for i in domain.interfaces if i.network]
    want = guest.interface
    if want:
        if _looks_like_mac(want):
            for i in domain.interfaces:
                if i.mac == want.lower():
                    if not i.network:
                        return None, f"interface {want} is not on a libvirt network"
                    return i, None
            return None, f"no interface with MAC {want}"
        for i in nics:
            if i.network == want:
                return i, None
        return None, f"no interface on network '{want}'"
    if not nics:
        return None, "no interface on a libvirt network"
    return nics[0], None


def _looks_like_mac(s: str) -> bool:
    parts = s.split(":")
    return len(parts) == 6 and all(len(p) == 2 for p in parts) and all(
        c in "0123456789abcdefABCDEF" for p in parts for c in p
    )


def _subnet_for(network, text: str):
    from vnethook import addr

    for s in network.subnets:
        if addr.in_network(text, s.cidr):
            return s
    return None


def _first_subnet(network, family: int):
    for s in network.subnets:
        if s.family == family:
            return s
    return None


def plan_guest(
    guest,
    domain,
    networks,
    leases,
    now=None,
) -> Plan:
    """Turn one guest's config entry into concrete forwards.

    guest: config.GuestConfig. domain: libvirt.Domain. networks: network name
    -> libvirt.Network. leases: bridge name -> unexpired libvirt.Lease list.
    Address precedence per family: the map's fixed address, then a static
    DHCP host of the network, then the newest lease for the NIC's MAC.
    """
    nic, why = _pick_nic(guest, domain)
    if nic is None:
        return Plan(domain.name, waiting=(f"{domain.name}: {why}",), pending=_all_pending(guest, why))
    network = networks.get(nic.network)
    if network is None:
        why = f"network '{nic.network}' is not running"
        return Plan(domain.name, waiting=(f"{domain.name}: {why}",), pending=_all_pending(guest, why))
    bridge = nic.bridge or network.bridge
    if not bridge:
        why = f"network '{nic.network}' has no bridge"
        return Plan(domain.name, waiting=(f"{domain.name}: {why}",), pending=_all_pending(guest, why))

    errors = []
    waiting = []
    blocked = set()  # families whose configured address belongs to another guest
    addrs = {}  # family -> (address, subnet)
    how = []  # (mac, address, where it came from)

    for a in guest.addresses:
        fam = _family(a)
        sub = _subnet_for(network, a)
        if sub is None:
            if not guest.allow_outside_network:
                errors.append(
                    f"{guest.origin}: guest '{domain.name}': address {a} is outside network "
                    f"'{network.name}' ({', '.join(s.cidr for s in network.subnets) or 'no subnet'}); "
                    f"set allow_outside_network: true to forward there anyway"
                )
                continue
            sub = _first_subnet(network, fam)
        addrs[fam] = (a, sub)
        how.append((nic.mac, a, "map"))

    if 4 not in addrs:
        for mac, ip in network.dhcp_hosts:
            if mac == nic.mac and _family(ip) == 4:
                sub = _subnet_for(network, ip)
                if sub is not None:
                    addrs[4] = (ip, sub)
                    how.append((nic.mac, ip, "static DHCP host"))
                break
    # A fixed or reserved address that dnsmasq has leased to another MAC
    # belongs to another guest now: a DNAT there would hand it our ports.
    for fam in sorted(addrs):
        a = addrs[fam][0]
        others = leased_to_others(leases.get(bridge, ()), a, nic.mac, now)
        if others:
            errors.append(
                f"{guest.origin}: guest '{domain.name}': address {a} is leased by dnsmasq to "
                f"{', '.join(others)}, not to {nic.mac}: not forwarding to it"
            )
            del addrs[fam]
            how = [h for h in how if h[1] != a]
            blocked.add(fam)
    for lease in _newest_first(leases.get(bridge, ()), nic.mac, now):
        fam = _family(lease.ip)
        if fam in addrs or fam in blocked:
            continue
        sub = _subnet_for(network, lease.ip)
        if sub is None:
            continue  # a stale lease from another subnet definition
        addrs[fam] = (lease.ip, sub)
        how.append((nic.mac, lease.ip, "lease"))

    forwards = []
    pending = []
    for rule in guest.forwards:
        if rule.host_address is not None:
            families = [_family(rule.host_address)]
        else:
            families = sorted(addrs) or [4]
        for fam in families:
            if fam in blocked:
                continue  # said in errors
            if fam not in addrs:
                why = (f"no IPv{fam} address yet for {nic.mac} on '{nic.network}' "
                       f"(no fixed address, static host or lease)")
                waiting.append(f"{domain.name}: {why}")
                pending.append((rule, fam, why))
                continue
            sources = tuple(s for s in rule.sources if _family(s.split("/")[0]) == fam)
            if rule.sources and not sources:
                continue  # restricted to sources of the other family only
            address, sub = addrs[fam]
            forwards.append(
                Forward(
                    domain=domain.name,
                    mac=nic.mac,
                    network=nic.network,
                    bridge=bridge,
                    subnet=sub.cidr if sub is not None else ("0.0.0.0/0" if fam == 4 else "::/0"),
                    family=fam,
                    guest_address=address,
                    protocol=rule.protocol,
                    host_address=rule.host_address,
                    host_ports=tuple(rule.host_ports),
                    guest_ports=tuple(rule.guest_ports),
                    sources=sources,
                    origin=rule.origin,
                )
            )
    return Plan(
        domain=domain.name,
        forwards=tuple(_dedupe(forwards)),
        waiting=tuple(dict.fromkeys(waiting)),
        errors=tuple(errors),
        addresses=tuple(how),
        pending=tuple(pending),
    )


def _newest_first(leases, mac, now):
    """The guest's usable leases, newest first.

    An address leased to another MAC at least as recently is not ours:
    dnsmasq hands an address to one client at a time, so the older entry
    is stale (or the file is forged), and a forward must never reach the
    wrong guest. A tie holds neither guest's forwards.
    """
    by_mac, by_ip = _lease_index(leases)
    live = lambda l: not now or l.expiry == 0 or l.expiry > now  # noqa: E731
    mine = [
        l for l in by_mac.get(mac, ()) if live(l)
        and not any(o.mac != mac and _rank(o) >= _rank(l) and live(o) for o in by_ip[l.ip])
    ]
    # expiry 0 means "never expires": treat it as the newest
    return sorted(mine, key=lambda l: (l.expiry == 0, l.expiry), reverse=True)


def leased_to_others(leases, address: str, mac: str, now) -> list:
    """The other MACs that hold `address` by a live lease at least as new as
    any of `mac`'s own (the same rule as _newest_first), sorted."""
    _, by_ip = _lease_index(leases)
    live = [l for l in by_ip.get(address, ()) if not now or l.expiry == 0 or l.expiry > now]
    mine = max((_rank(l) for l in live if l.mac == mac), default=None)
    return sorted({l.mac for l in live if l.mac != mac and (mine is None or _rank(l) >= mine)})


def _rank(lease):
    return float("inf") if lease.expiry == 0 else lease.expiry


def _lease_index(leases):
    """Leases by MAC and by address, built once per (read-only) lease list:
    sync plans 1000 guests against one lease file."""
    index = getattr(leases, "by_key", None)
    if index is not None:
        return index
    by_mac: dict = {}
    by_ip: dict = {}
    for l in leases:
        by_mac.setdefault(l.mac, []).append(l)
        by_ip.setdefault(l.ip, []).append(l)
    index = (by_mac, by_ip)
    try:
        leases.by_key = index  # libvirt.LeaseList: read-only, so the index stays true
    except AttributeError:
        pass  # a plain list or tuple: no place to keep it
    return index


def _dedupe(forwards):
    return list(dict.fromkeys(forwards))
