"""Forwards as iptables rules in the legacy (x_tables) tables.

For hosts whose `iptables` is iptables-legacy: libvirt's REJECT then lives
in the legacy tables, and only a legacy accept ahead of it helps (an accept
in the nft-backed tables would be a different hook entirely). The rules are
exactly the nft flavour's (iptables_rules renders both), and so is the
transport: one `iptables-legacy-restore --noflush -w` batch per family per
change, fed on stdin. Each table section is one libiptc commit, which
replaces the whole table in one kernel call, so changes are atomic per
table, and the nft flavour's revert-on-failure covers the rest (see
iptables_nft). `-w` takes the xtables lock, which matters more here than
with nft: a legacy table commit replaces everything, so two writers without
the lock lose each other's rules.

Why not python-iptables (iptc) in-process, as first planned: with
python-iptables 1.0.1 and iptables >= 1.8.7 (Debian 12), DNAT, SNAT and
MASQUERADE live in one extension, libxt_NAT.so, whose constructor registers
the targets only for the address family active when it is first loaded.
Using DNAT for IPv4 and then IPv6 in one process fails ("can't find target
DNAT"), and forcing a re-registration makes libxtables print `target "DNAT"
already registered` and call exit(1), killing the process from C with no
exception, which a libvirt hook cannot afford. iptc also does not take the
xtables lock and costs ~0.2 s to import; a restore process costs ~5 ms.
"""

from __future__ import annotations

from vnethook.firewall.iptables_nft import IptablesNftBackend


class IptablesLegacyBackend(IptablesNftBackend):
    """iptables-legacy: one iptables-legacy-restore batch per family per change."""

    name = "iptables-legacy"
    restore_tools = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
    save_tools = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
