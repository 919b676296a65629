"""`./try-it`: vnethook's main job, for real, in a sandbox.

A real libvirtd runs in its own mount and network namespaces (see
sandbox.py), so the host's network, firewall and libvirt stay as they were.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sandbox import Sandbox, mac_for  # noqa: E402
from vnethook_env import VnethookEnv  # noqa: E402

MAP = """\
# The example map, as /etc/vnethook/ports.yaml would hold it:
guests:
  web1:
    - 8080:80          # host port 8080 -> guest port 80 (tcp)
"""


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--firewall", choices=("iptables", "nftables"), default="iptables",
                    help="libvirt's firewall backend in the sandbox (default: Debian's default, iptables)")
    args = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="vnethook-try-"))
    try:
        return _demo(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _demo(args, tmp: pathlib.Path) -> int:
    say(f"starting a private libvirtd (firewall_backend={args.firewall}) in its own namespaces")
    with Sandbox(firewall_backend=args.firewall, tmpdir=str(tmp / "sandbox")) as sb:
        vh = VnethookEnv(sb, tmp)
        vh.write_map(MAP)
        print(MAP)
        vh.install()
        say("defining NAT network 'demo' on 192.0.2.0/24 and guest 'web1'")
        sb.define_network("demo", "vnhdemo0", "192.0.2.0/24")
        mac = mac_for(1)
        sb.define_domain("web1", macs=[mac], network="demo")
        guest = sb.add_guest_netns("web1", mac, network="demo")
        ip = guest.dhcp(hostname="web1")
        print(f"web1 ({mac}) got {ip} from libvirt's dnsmasq")
        guest.serve_tcp(80, "hello from web1, port 80")
        ext = sb.add_external("198.51.100.0/24")
        print(f"an outside client sits at {ext.ip}; the host's outside address is {ext.host_ip}")

        say("virsh start web1")
        sb.start("web1")
        r = ext.connect_tcp(ext.host_ip, 8080, "GET /")
        print(f"outside client -> {ext.host_ip}:8080 : {r.status}: {r.data!r}")
        if not r.ok:
            print("the forward did not work; hook log:\n" + vh.log_text(), file=sys.stderr)
            return 1

        say("vnethook status")
        print(vh.run(vh.cli_argv("status"), check=False).stdout)

        say("virsh destroy web1")
        sb.destroy("web1")
        r = ext.connect_tcp(ext.host_ip, 8080, "GET /", timeout=2)
        print(f"outside client -> {ext.host_ip}:8080 : {r.status} (the forward is gone)")
        print(vh.run(vh.cli_argv("status"), check=False).stdout)
        say("cleaning up the sandbox")
    print(
        """
Next, on a real host:
  1. install the package (README.md: Install), or `pip install .` and `sudo vnethook install`
  2. describe your guests' ports in /etc/vnethook/ports.yaml, then `sudo vnethook check`
  3. `virsh start GUEST` and look at `sudo vnethook status`
  4. after editing the map for running guests: `sudo vnethook sync`"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
