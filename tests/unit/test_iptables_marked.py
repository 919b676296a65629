"""The marked layout (iptables-legacy), as pure logic.

Why it exists: a legacy change replaces whole tables in the kernel, so its
cost is the entries of the tables it touches. What it does to packets (our
DNAT keeps the ct mark bit, nothing else does; the one static accept; the
per-guest hairpin) is proven with real traffic in tests/acceptance
(test_foreign_dnat_not_accepted, the hairpin and loopback tests, the
old-layout upgrade). Here: what is rendered, how a listing is read back,
which problems it reports, what repairs and the teardown contain.
"""

from __future__ import annotations

from typing import Dict, List

from vnethook.firewall import iptables_rules as ir
from vnethook.firewall.iptables_legacy import IptablesLegacyBackend
from forward_factory import fwd

BIT = "0x2000000/0x2000000"


def save(family: int, tables: Dict[str, List[str]]) -> str:
    """iptables-save text with the given `-A`/`:` lines per table."""
    out = []
    for t, lines in tables.items():
        out.append(f"*{t}")
        chains = sorted({ln.split()[1] for ln in lines if ln.startswith("-A ")} |
                        {ln[1:].split()[0] for ln in lines if ln.startswith(":")})
        builtin = {"nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
                   "filter": ["INPUT", "FORWARD", "OUTPUT"]}[t]
        out += [f":{c} ACCEPT [0:0]" for c in builtin]
        out += [f":{c} - [0:0]" for c in chains if c not in builtin]
        out += [ln for ln in lines if ln.startswith("-A ")]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def healthy(fam: int = 4, guests: List[ir.Rule] = ()) -> Dict[str, List[str]]:
    tables: Dict[str, List[str]] = {"nat": [], "filter": []}
    for j in ir.base_jumps(fam, True):
        tables[j.table].append(f"-A {j.chain} {j.spec}")
    for c in ir.OUR_CHAINS_MARKED["nat"]:
        tables["nat"].append(f":{c}")
    tables["filter"].append(f":{ir.CHAIN_FWD}")
    for (t, c), rules in ir.base_rules(fam, True).items():
        tables[t] += [f"-A {c} {r.spec}" for r in rules]
    for r in guests:
        tables[r.table].append(f"-A {r.chain} {r.spec}")
    return tables


def test_per_forward_only_a_dnat_and_one_shared_hairpin_per_subnet():
    fws = [fwd(), fwd(protocol="udp"), fwd(host_ports=(9000, 9009), guest_ports=(9000, 9009))]
    rules = ir.render(fws, marked=True)
    dnat = [r for r in rules if r.target == "DNAT"]
    masq = [r for r in rules if r.target == "MASQUERADE"]
    assert len(dnat) == 3 and len(masq) == 1 and len(rules) == 4
    assert not any(r.table == "filter" for r in rules)
    assert masq[0].spec == (f'-s 192.0.2.0/24 -d 192.0.2.0/24 -m connmark --mark {BIT} '
                            '-m comment --comment "vnethook:hairpin" -j MASQUERADE')
    assert ir.is_shared(masq[0].canonical) and not any(ir.is_shared(r.canonical) for r in dnat)
    # another guest on the subnet needs the very same rule
    assert masq[0] in ir.render([fwd(domain="db", guest_address="192.0.2.11")], marked=True)
    # the DNATs are the guest's (tagged), in the shared chain: no per-guest chains
    assert all(ir.key_of(r.spec) == fws[0].key and not ir.is_guest_chain(r.chain) for r in dnat)
    # the unmarked layout (iptables-nft) is unchanged: accept + masquerade per forward
    plain = ir.render(fws)
    assert sum(r.table == "filter" for r in plain) == 3 and sum(r.target == "MASQUERADE" for r in plain) == 3


def test_loopback_sources_are_masqueraded_by_the_base():
    rules = ir.render([fwd(host_address="127.0.0.1"), fwd(host_address="127.0.0.1", host_ports=(8081, 8081))],
                      marked=True)
    assert sorted(r.src for r in rules if r.target == "MASQUERADE") == ["192.0.2.0/24"]
    assert [r.spec for r in ir.base_rules(4, True)[("nat", ir.CHAIN_SNAT)]] == [
        f"-s 127.0.0.0/8 -m connmark --mark {BIT} -j MASQUERADE"]
    assert ir.base_rules(6, True)[("nat", ir.CHAIN_SNAT)] == []
    v6 = ir.render([fwd(family=6, subnet="2001:db8:1::/64", guest_address="2001:db8:1::10",
                        host_address="::1")], marked=True)
    assert [r.src for r in v6 if r.target == "MASQUERADE"] == ["2001:db8:1::/64"]


def test_listing_shows_a_subnets_hairpin_with_each_guest_in_it():
    web = ir.render([fwd()], marked=True)
    db = ir.render([fwd(domain="db", guest_address="192.0.2.11", host_ports=(5432, 5432))], marked=True)
    other = ir.render([fwd(domain="x", guest_address="198.51.100.5", subnet="198.51.100.0/24",
                           host_ports=(7000, 7000))], marked=True)
    rules = list(dict.fromkeys(web + db + other))
    st = ir.family_state(4, ir.parse_save(save(4, healthy(4, rules))), True)
    assert sorted(st.guests[fwd().key]) == sorted(r.canonical for r in web)
    assert sorted(st.guests[fwd(domain="db").key]) == sorted(r.canonical for r in db)
    assert sorted(st.guests[fwd(domain="x").key]) == sorted(r.canonical for r in other)
    assert len(st.shared) == 2 and st.problems() == []
    # with the hairpin gone, each guest of that subnet differs from its record
    t = healthy(4, [r for r in rules if not (r.target == "MASQUERADE" and r.src == "192.0.2.0/24")])
    st = ir.family_state(4, ir.parse_save(save(4, t)), True)
    assert sorted(st.guests[fwd().key]) == sorted(r.canonical for r in web if r.target == "DNAT")


def test_base_rules_set_call_clear_and_one_static_accept():
    base = ir.base_rules(4, True)
    assert [r.spec for r in base[("nat", ir.CHAIN_MARK)]] == [
        f"-j CONNMARK --set-xmark {BIT}", f"-j {ir.CHAIN_DNAT}", "-j CONNMARK --set-xmark 0x0/0x2000000"]
    assert [r.spec for r in base[("filter", ir.CHAIN_FWD)]] == [
        f"-m conntrack --ctstate DNAT -m connmark --mark {BIT} -j ACCEPT"]
    assert ir.base_rules(4) == {}
    jumps = {(j.chain, j.target) for j in ir.base_jumps(6, True)}
    assert ("PREROUTING", ir.CHAIN_MARK) in jumps and ("OUTPUT", ir.CHAIN_MARK) in jumps
    assert ("POSTROUTING", ir.CHAIN_SNAT) in jumps and ("FORWARD", ir.CHAIN_FWD) in jumps


def test_listing_reads_base_rules_apart_from_guests():
    guest = ir.render([fwd()], marked=True)
    st = ir.family_state(4, ir.parse_save(save(4, healthy(4, guest))), True)
    assert st.problems() == [] and st.base_wrong() == []
    assert st.untagged == []
    assert sorted(st.guests[fwd().key]) == sorted(r.canonical for r in guest)
    assert st.present


def test_problems_name_a_wrong_base():
    t = healthy()
    # the clear rule gone: the mark would stick to connections we did not DNAT
    t["nat"] = [ln for ln in t["nat"] if "0x0/" not in ln]
    st = ir.family_state(4, ir.parse_save(save(4, t)), True)
    assert st.base_wrong() == [("nat", ir.CHAIN_MARK)]
    assert any("VNETHOOK-MARK does not hold exactly" in p for p in st.problems())
    # out of order is wrong too
    t = healthy()
    i = [n for n, ln in enumerate(t["nat"]) if ln.startswith(f"-A {ir.CHAIN_MARK}")]
    t["nat"][i[0]], t["nat"][i[2]] = t["nat"][i[2]], t["nat"][i[0]]
    st = ir.family_state(4, ir.parse_save(save(4, t)), True)
    assert st.base_wrong() == [("nat", ir.CHAIN_MARK)]


def test_old_layout_jumps_are_stray():
    t = healthy()
    t["nat"].append(f"-A PREROUTING -m addrtype --dst-type LOCAL -j {ir.CHAIN_DNAT}")
    st = ir.family_state(4, ir.parse_save(save(4, t)), True)
    assert any("stray jump PREROUTING" in p for p in st.problems())


def test_repair_lines_refill_only_what_is_wrong():
    b = IptablesLegacyBackend()
    t = healthy()
    t["filter"] = [ln for ln in t["filter"] if "connmark" not in ln]
    st = ir.family_state(4, ir.parse_save(save(4, t)), True)
    sections: Dict[str, List[str]] = {"nat": [], "filter": []}
    b._base_lines(4, st, sections)
    assert sections["nat"] == []
    assert sections["filter"] == [f":{ir.CHAIN_FWD} - [0:0]",
                                  f"-A {ir.CHAIN_FWD} -m conntrack --ctstate DNAT -m connmark --mark {BIT} -j ACCEPT"]


def test_repair_keeps_old_layout_guest_rules_in_the_accept_chain():
    b = IptablesLegacyBackend()
    old_accept = ir.render([fwd()])[1]  # a per-forward accept of the old layout
    assert old_accept.chain == ir.CHAIN_FWD
    t = healthy(4, [old_accept])
    t["filter"] = [ln for ln in t["filter"] if "connmark" not in ln]
    st = ir.family_state(4, ir.parse_save(save(4, t)), True)
    sections: Dict[str, List[str]] = {"nat": [], "filter": []}
    b._base_lines(4, st, sections)
    assert not any(ln.startswith(":") for ln in sections["filter"])  # no flush: the guest's rule stays
    assert sections["filter"][-1].startswith(f"-A {ir.CHAIN_FWD} -m conntrack")


def test_teardown_flushes_base_chains_before_deleting_and_nat_decides():
    sections = IptablesLegacyBackend()._teardown_sections(4)
    nat = sections["nat"]
    assert nat.index(f"-F {ir.CHAIN_MARK}") < nat.index(f"-X {ir.CHAIN_MARK}") < nat.index(f"-X {ir.CHAIN_DNAT}")
    assert nat.index(f"-F {ir.CHAIN_SNAT}") < nat.index(f"-X {ir.CHAIN_SNAT}")
    # a DNAT chain still holding guests fails the nat section, which comes first
    assert ir.TABLES.index("nat") < ir.TABLES.index("filter")
    assert sections["filter"] == [f"-D FORWARD -j {ir.CHAIN_FWD}", f"-F {ir.CHAIN_FWD}", f"-X {ir.CHAIN_FWD}"]
