"""Every filesystem location vnethook reads or writes, with test overrides.

Three environment variables move everything, so tests and unusual installs
can point vnethook at fixtures without patching code:

- VNETHOOK_CONFIG: the port map, a file or a directory
  (default: /etc/vnethook/ports.yaml + /etc/vnethook/ports.d/*.yaml).
- VNETHOOK_LIBVIRT_ROOT: a prefix for libvirt's own trees
  (/etc/libvirt, /run/libvirt, /var/lib/libvirt). Default "/".
- VNETHOOK_STATE_DIR: vnethook's runtime state (default /run/vnethook).
  It lives on tmpfs on purpose: firewall rules do not survive a reboot
  either, so neither should the record of them.
"""

from __future__ import annotations

import os

from vnethook.model import Value

DEFAULT_CONFIG_DIR = "/etc/vnethook"
DEFAULT_STATE_DIR = "/run/vnethook"


class Paths(Value):
    """(A Value, not a dataclass: this module is imported by every hook run.)"""

    config: str  # file or directory given by the user, or DEFAULT_CONFIG_DIR
    libvirt_root: str
    state_dir: str

    # libvirt's trees
    @property
    def libvirt_etc(self) -> str:
        return os.path.join(self.libvirt_root, "etc/libvirt")

    @property
    def libvirt_run(self) -> str:
        return os.path.join(self.libvirt_root, "run/libvirt")

    @property
    def libvirt_lib(self) -> str:
        return os.path.join(self.libvirt_root, "var/lib/libvirt")

    @property
    def network_conf(self) -> str:
        return os.path.join(self.libvirt_etc, "network.conf")

    @property
    def hooks_dir(self) -> str:
        return os.path.join(self.libvirt_etc, "hooks")

    @property
    def dnsmasq_dir(self) -> str:
        return os.path.join(self.libvirt_lib, "dnsmasq")

    @property
    def running_domains_dir(self) -> str:
        return os.path.join(self.libvirt_run, "qemu")

    @property
    def running_networks_dir(self) -> str:
        return os.path.join(self.libvirt_run, "network")

    def lease_file(self, bridge: str) -> str:
        return os.path.join(self.dnsmasq_dir, f"{bridge}.status")

    def hosts_file(self, network: str) -> str:
        return os.path.join(self.dnsmasq_dir, f"{network}.hostsfile")

    def running_domain_xml(self, domain: str) -> str:
        return os.path.join(self.running_domains_dir, f"{domain}.xml")

    def running_network_xml(self, network: str) -> str:
        return os.path.join(self.running_networks_dir, f"{network}.xml")

    # vnethook's own state
    @property
    def guests_dir(self) -> str:
        return os.path.join(self.state_dir, "guests")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.state_dir, "lock")

    @property
    def config_cache(self) -> str:
        return os.path.join(self.state_dir, "config.cache")

    @property
    def domains_cache(self) -> str:
        return os.path.join(self.state_dir, "domains.cache")


def get_paths(config: str | None = None) -> Paths:
    return Paths(
        config=config or os.environ.get("VNETHOOK_CONFIG") or DEFAULT_CONFIG_DIR,
        libvirt_root=os.environ.get("VNETHOOK_LIBVIRT_ROOT") or "/",
        state_dir=os.environ.get("VNETHOOK_STATE_DIR") or DEFAULT_STATE_DIR,
    )
