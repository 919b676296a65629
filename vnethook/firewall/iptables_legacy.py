"""Forwards as iptables rules in the legacy (x_tables) tables.

For hosts whose `iptables` is iptables-legacy: libvirt's REJECT then lives
in the legacy tables, and only a legacy accept ahead of it helps. The change
logic is the shared restore driver's (iptables_nft.IptablesBackend plans
every change as restore lines and runs them through `iptables-legacy-restore --noflush -w`, which
takes the xtables lock); the rules are iptables_rules' marked layout,
because here every commit replaces the whole table in the kernel and costs
what the table holds (IPT_SO_SET_REPLACE reads and replaces every entry):
one DNAT entry per forward and nothing per forward in filter.

Why no in-process libiptc (python-iptables), which earlier releases used
for IPv4: measured with benchmarks/ab.py against a restore run, it was
slower, not faster (started + stopped of a guest with 10 forwards 1.48x
with no other guest, 1.12x with 1000: README, Performance), since
importing the binding and building rules through ctypes cost more than
the process it saved, and it needed the xtables lock, the library search
and an IPv6 path of its own (its NAT extension registers one family per
process).
"""

from __future__ import annotations

from vnethook.firewall.iptables_nft import IptablesBackend


class IptablesLegacyBackend(IptablesBackend):
    """iptables-legacy: one `*-legacy-restore` batch per family per change."""

    name = "iptables-legacy"
    forward_flavour = "legacy"
    # Shared chains only. A legacy commit replaces the whole table anyway,
    # so per-guest chains save nothing there and cost more: 3 chains per
    # guest make the blob bigger (slower with 1000 guests in
    # benchmarks/run, started and stopped alike). Both layouts are read
    # and changed by the same code (IptablesBackend._plan).
    per_guest_chains = False
    # The marked layout (IptablesBackend's default): a change costs what the
    # tables it replaces hold, so per forward only a DNAT entry
    # (iptables_rules' module docstring).
    restore_tools = {4: "iptables-legacy-restore", 6: "ip6tables-legacy-restore"}
    save_tools = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
    # The tables are x_tables, not nf_tables: nfnetlink cannot count, list
    # or delete in them, so this driver offers none of IptablesNftBackend's
    # netlink shortcuts, and a removal's teardown rides in the same restore
    # run as an optional step (converge.py) that fails harmlessly while
    # guests remain.
