"""A real guest: a Debian kernel that boots, takes its own lease, serves.

The other e2e tests play a guest's network side with a netns. Here the
guest is a real Linux (guest_image.py: Debian's kernel and a busybox
initramfs, built from Debian packages at test time and cached), booted by
the sandboxed libvirtd under QEMU. Its DHCP lease arrives after libvirt's
`started` hook, as on every real boot, so the forward has to follow the
lease: the test measures how long after the lease appears in libvirt's
dnsmasq status file the forward first answers an external client (at most
1 s), then `virsh shutdown`s the guest (an ACPI power button press that the
guest's acpid turns into a power-off) and requires the firewall to be
exactly what it was before the guest started.

TCG by default. VNETHOOK_E2E_GUEST_ACCEL=kvm uses libvirt's kvm domain type
instead, when /dev/kvm works for Linux guests (on a nested VM it may not:
on the machine this was written on, SeaBIOS runs under KVM but Debian's
kernel hangs right after it is decompressed).
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import time

import pytest

from sandbox import PYTHON, TOOLS, Sandbox, mac_for
from vnethook_env import VnethookEnv, without_new_empty_base_chains

pytestmark = [pytest.mark.e2e, pytest.mark.distros("debian12-iptables", "debian13-nftables")]

HOST_EXT = "198.51.100.1"
LEASEPROBE = os.path.join(TOOLS, "leaseprobe.py")
LATENCY_LIMIT = 1.0


def _accel() -> str:
    want = os.environ.get("VNETHOOK_E2E_GUEST_ACCEL", "tcg")
    if want == "kvm":
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            pytest.skip("VNETHOOK_E2E_GUEST_ACCEL=kvm but /dev/kvm is not usable")
        return "kvm"
    return "qemu"


def test_real_guest_lease_forward_and_shutdown(sandbox: Sandbox, image, tmp_path):
    sb = sandbox
    vh = VnethookEnv(sb, tmp_path)
    vh.install()
    sb.define_network("vnhnet", "vnhbr0", "192.0.2.0/24")
    name, mac = "rguest1", mac_for(0x31)
    vh.write_map(
        """
        guests:
          rguest1:
            - 8080:80
            - 5353:53/udp
        """
    )
    sb.define_linux_guest(name, mac, image.kernel, image.initrd,
                          f"console=ttyS0 quiet vnh.name={name} vnh.tcp=80 vnh.udp=53",
                          accel=_accel())
    ext = sb.add_external()
    before = vh.ruleset_text()

    probe = subprocess.Popen(
        ext.argv([PYTHON, LEASEPROBE, "/var/lib/libvirt/dnsmasq/vnhbr0.status", mac, HOST_EXT,
                  "8080", "5353", "120"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sb._env(None))
    try:
        t_start = time.monotonic()
        sb.start(name)
        t_started = time.monotonic()
        # `started` has run and returned: no lease yet, vnethook waits for it
        leased_at_start = [e for e in sb.leases() if e.get("mac-address") == mac]
        record = vh.records_of(name)
        out, err = probe.communicate(timeout=150)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.communicate()
    diag = (f"probe: {out} {err}\nconsole:\n{sb.console_log(name)[-3000:]}\n"
            f"hook log:\n{vh.log_text()[-3000:]}")
    assert leased_at_start == [], "the guest had a lease before `started` returned\n" + diag
    assert record.get("waiting"), f"no address at `started`: the record says it waits: {record}"
    res = json.loads(out)
    assert "t_lease" in res, "the guest never got a lease\n" + diag
    assert res.get("tcp") == f"{name} tcp", diag
    assert res.get("udp") == f"{name} udp", diag
    boot = res["t_lease"] - t_start
    tcp_latency = res["t_tcp"] - res["t_lease"]
    udp_latency = res["t_udp"] - res["t_lease"]
    print(f"\nreal guest ({sb.distro}, {sb.firewall_backend}/{sb.iptables}, {_accel()}): virsh start "
          f"{t_started - t_start:.2f}s, start -> lease {boot:.2f}s, "
          f"lease -> forward answers: tcp {tcp_latency * 1000:.0f} ms, "
          f"udp {udp_latency * 1000:.0f} ms (image {'built' if image.built else 'cached'}, "
          f"{image.seconds:.1f}s)")
    assert tcp_latency <= LATENCY_LIMIT, f"tcp forward {tcp_latency:.2f}s after the lease\n" + diag
    assert udp_latency <= LATENCY_LIMIT, f"udp forward {udp_latency:.2f}s after the lease\n" + diag
    assert res["lease"]["ip-address"] in json.dumps(vh.records_of(name))
    assert vh.status_json()["guests"][0]["drift"] == []

    # virsh shutdown: ACPI power button -> the guest's acpid -> poweroff -f
    t0 = time.monotonic()
    sb.virsh("shutdown", name)
    sb.wait_for(lambda: name not in sb.virsh("list", "--name").split(), timeout=60,
                what=f"{name} to power itself off")
    took = time.monotonic() - t0
    state = sb.virsh("domstate", "--reason", name).strip()
    assert state == "shut off (shutdown)", f"{state}\n" + diag
    print(f"virsh shutdown -> shut off: {took:.2f}s")
    assert "powering off" in sb.console_log(name)
    assert not ext.connect_tcp(HOST_EXT, 8080, timeout=1).ok
    assert not ext.send_udp(HOST_EXT, 5353, timeout=1).ok
    assert vh.records() == []
    after, leftover = without_new_empty_base_chains(vh.ruleset_text(), before)
    if leftover:
        print("left behind by iptables-nft (empty base chains, policy accept): "
              + ", ".join(leftover))
    assert after == before, "the firewall differs from before the guest started:\n" + "\n".join(
        difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after",
                             lineterm=""))
