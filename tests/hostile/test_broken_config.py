"""A broken map never takes working forwards away from running guests.

Real rules in a netns host: two guests get their forwards through the hook,
then the map breaks in several ways. Every event that re-plans (qemu
started/reconnect, network started/updated/port-created) and `vnethook
sync` must leave every rule byte-identical; `stopped` still removes the
stopped guest's rules from its record; a good map then converges.
"""

from __future__ import annotations

import os

from hostile_support import NETWORK, hook_data

WEB = ("web", ["52:54:00:00:00:01"])
DB = ("db", ["52:54:00:00:00:02"])
GOOD = {"web": "{address: 192.0.2.10, forward: [8080:80, 30000-30009:40000-40009/udp]}",
        "db": "{address: 192.0.2.11, forward: [5432:5432]}"}

BROKEN = {
    "syntax": "guests:\n  web: [8080:80\n",
    "tab": "guests:\n\tweb: [8080:80]\n",
    "wrong type": "guests:\n  web: 8080\n",
    "port 0": "guests:\n  web: [0:80]\n",
    "not utf-8": b"guests:\n  web: [8080:80] # \xff\xfe\n",
}


def port_xml(domain: str, mac: str) -> bytes:
    hd = hook_data()
    port = (f"  <networkport>\n    <owner>\n      <name>{domain}</name>\n    </owner>\n"
            f"    <mac address='{mac}'/>\n    <plug type='network' bridge='virbr9'/>\n  </networkport>\n")
    return hd.replace("</hookData>", port + "</hookData>").encode()


def fire_everything(host):
    """Every event that could re-plan, plus both kinds of sync; all must exit 0 except sync."""
    name, macs = WEB
    data = host.run_domain(name, macs)
    outs = []
    for kind, obj, op, stdin in [
        ("qemu", name, "prepare", data), ("qemu", name, "start", data),
        ("qemu", name, "started", data), ("qemu", name, "reconnect", data),
        ("network", NETWORK, "started", hook_data().encode()),
        ("network", NETWORK, "updated", hook_data().encode()),
        ("network", NETWORK, "port-created", port_xml(name, macs[0])),
    ]:
        p = host.hook(kind, obj, op, stdin)
        assert p.returncode == 0, (op, p.stderr)
        assert p.stdout == b""
        outs.append(p.stderr.decode(errors="replace"))
    for args in (["sync"], ["sync", "--no-verify"]):
        p = host.cli(*args)
        assert p.returncode == 1, p.stdout
        outs.append(p.stderr.decode(errors="replace"))
    return outs


def test_broken_map_keeps_running_guests_rules(host):
    host.write_map(GOOD)
    for g in (WEB, DB):
        assert host.started(*g).returncode == 0
    good = host.dump()
    ours = host.ours(good)
    assert any("5432" in l for l in ours) and any("8080" in l for l in ours)
    records = host.records()
    for label, text in BROKEN.items():
        host.write_raw(text)
        for out in fire_everything(host):
            assert "ports.yaml" in out and "Traceback" not in out, (label, out)
        assert host.dump() == good, label
        assert host.records() == records, label
    # Refused for its permissions: just as broken.
    host.write_map(GOOD)
    os.chmod(host.cfg / "ports.yaml", 0o666)
    for out in fire_everything(host):
        assert "writable by group and others" in out, out
    assert host.dump() == good
    # `stopped` works from the record, map or no map.
    host.write_raw(BROKEN["syntax"])
    p = host.stopped(*DB)
    assert p.returncode == 0, p.stderr
    left = host.ours()
    assert not any("5432" in l for l in left) and any("8080" in l for l in left)
    assert set(host.records()) == {k for k in records if k.startswith("web")}
    # A good map arrives: sync converges to it, with nothing lost or doubled.
    host.write_map(GOOD)
    p = host.cli("sync")
    assert p.returncode == 0, p.stderr
    assert sorted(host.ours()) == sorted(left)
    assert host.foreign(host.dump()) == host.foreign(good)
