"""The per-guest chain layout of iptables-nft, as pure logic.

What the restore batches do to a kernel is proven in tests/acceptance
(real rules, real packets, byte-identical teardown). Here: chain names fit
iptables' limit and differ per guest, `place` gives every rule a guest
chain and one tagged jump per chain, and `_plan` changes a guest by
refilling only the chains that changed, deletes only by spec in the
shared chains, and its inverse plan (new -> old) is what the fast path
uses to undo committed tables.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
from forward_factory import fwd
from fresh import RULESETS, in_netns, why_no_netns

from vnethook.firewall import iptables_rules as ir
from vnethook.firewall.iptables_nft import IptablesNftBackend
from vnethook.model import Forward


def record(forwards: List[Forward], marked: bool = True) -> List[str]:
    """A guest's record as iptables-nft makes it (marked layout, own chains)."""
    return [r.canonical for r in ir.place(forwards[0].key, ir.render(forwards, marked))]


def plan(old: List[str], new: List[str], existing=()) -> Dict[str, List[str]]:
    sections: Dict[str, List[str]] = {"nat": [], "filter": []}
    IptablesNftBackend._plan(sections, old, new, existing)
    return sections


def test_chain_names_fit_and_differ():
    names = set()
    for dom in ["web1", "web2", "a" * 200, "ünïcode-guest", "web1 "]:
        key = fwd(domain=dom).key
        for shared in ir.GUEST_CHAINS:
            c = ir.guest_chain(shared, key)
            assert len(c) <= 28 and ir.is_guest_chain(c) and c.startswith("VNETHOOK-")
            names.add(c)
    assert len(names) == 15
    assert not any(ir.is_guest_chain(c) for cs in ir.OUR_CHAINS.values() for c in cs)


@pytest.mark.parametrize("marked", [False, True])
def test_place_moves_rules_and_adds_one_tagged_jump_per_chain(marked):
    fws = [fwd(), fwd(protocol="udp")]
    rules = ir.place(fws[0].key, ir.render(fws, marked))
    shared = [r for r in rules if ir.is_shared(r.canonical)]
    jumps = [r for r in rules if not ir.is_guest_chain(r.chain) and r not in shared]
    chains = [ir.CHAIN_DNAT] if marked else list(ir.GUEST_CHAINS)
    assert sorted((j.chain, j.target) for j in jumps) == sorted(
        (s, ir.guest_chain(s, fws[0].key)) for s in chains)
    assert all(ir.key_of(r.spec) == fws[0].key for r in rules if r not in shared)
    assert all(ir.is_guest_chain(r.chain) for r in rules if r not in jumps and r not in shared)
    # marked: the subnet's hairpin stays in the shared chain, and no accept per forward
    assert [r.chain for r in shared] == ([ir.CHAIN_SNAT] if marked else [])
    assert not marked or not any(r.table == "filter" for r in rules)


def test_new_guest_declares_fills_then_jumps():
    new = record([fwd()])
    s = plan([], new)
    assert s["filter"] == []  # marked: the base's one static accept serves every guest
    for table, lines in s.items():
        if not lines:
            continue
        decl = [i for i, ln in enumerate(lines) if ln.startswith(":")]
        jumps = [i for i, ln in enumerate(lines) if ln.startswith("-A VNETHOOK-") and
                 not ir.is_guest_chain(ln.split()[1])]
        assert decl and jumps and max(decl) < min(jumps)
        assert not any(ln.startswith("-D") for ln in lines)


def test_change_refills_only_the_changed_chain_and_keeps_jumps():
    old = record([fwd()])
    new = record([fwd(host_ports=(8081, 8081))])  # DNAT changes; accept and masquerade do not
    s = plan(old, new)
    assert s["filter"] == []
    dnat = ir.guest_chain(ir.CHAIN_DNAT, fwd().key)
    assert s["nat"][0] == f":{dnat} - [0:0]"
    assert all(ln.split()[1] == dnat for ln in s["nat"][1:])


def test_remove_flushes_unjumps_and_deletes_chains():
    old = record([fwd()])
    s = plan(old, [])
    assert s["filter"] == []  # marked: nothing per guest in filter
    for table, lines in s.items():
        if not lines:
            continue
        ops = [ln.split()[0] for ln in lines]
        assert set(ops) == {"-D", "-F", "-X"}
        assert ops.index("-X") > max(i for i, o in enumerate(ops) if o == "-D")
        assert all(ln.startswith("-D VNETHOOK-") for ln in lines if ln.startswith("-D"))


def test_inverse_plan_restores_the_old_chains():
    old = record([fwd()])
    new = record([fwd(), fwd(protocol="udp")])
    undo = plan(new, old)
    # every chain of the old record is refilled with exactly its old rules
    for table in ir.TABLES:
        lines = undo[table]
        for r in old:
            _, t, chain, spec = ir.split_canonical(r)
            if t == table and ir.is_guest_chain(chain):
                assert f"-A {chain} {spec}" in lines


def test_upgrade_from_the_shared_layout_deletes_by_spec():
    shared = [r.canonical for r in ir.render([fwd()])]
    s = plan(shared, record([fwd()]))
    deleted = [ln for lines in s.values() for ln in lines if ln.startswith("-D")]
    assert len(deleted) == len(shared)


def test_upgrade_from_per_forward_accepts_drops_their_chains():
    """A host upgraded with guests running: the per-forward accepts (any DNAT
    to the guest port passed them) and per-guest masquerades go."""
    old = record([fwd()], marked=False)
    s = plan(old, record([fwd()]))
    key = fwd().key
    for shared in (ir.CHAIN_FWD, ir.CHAIN_SNAT):
        own = ir.guest_chain(shared, key)
        table = "filter" if shared == ir.CHAIN_FWD else "nat"
        assert f"-F {own}" in s[table] and f"-X {own}" in s[table]
        assert any(ln.startswith(f"-D {shared} ") for ln in s[table])
    assert not any(ln.startswith("-A") for ln in s["filter"])


def test_slow_path_drops_an_empty_chain_left_behind():
    key = fwd().key
    left = ("nat", ir.guest_chain(ir.CHAIN_SNAT, key))
    s = plan([], [], [left])
    assert s["nat"] == [f"-F {left[1]}", f"-X {left[1]}"]


# --- the kernel's answers (private network namespace) ------------------------------------

NO_NETNS = why_no_netns("iptables-nft-restore")


@pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")
def test_netlink_counts_and_base_check_match_the_kernel():
    code = """
        import json, subprocess, sys
        from vnethook.firewall.nfnetlink import chain_use, chain_rules
        from vnethook.firewall.iptables_nft import IptablesNftBackend
        be = IptablesNftBackend()
        out = {"before": [chain_use(4, "filter", "VNETHOOK-FWD"), be._base_in_place(4)]}
        subprocess.run(["iptables-nft-restore", "--noflush"], check=True, input=(
            "*filter\\n:VNETHOOK-FWD - [0:0]\\n:X - [0:0]\\n-A FORWARD -j X\\n"
            "-I FORWARD 1 -j VNETHOOK-FWD\\n"
            "-A VNETHOOK-FWD -m conntrack --ctstate DNAT -m connmark --mark 0x2000000/0x2000000 -j ACCEPT\\n"
            "COMMIT\\n"
            "*nat\\n:VNETHOOK-MARK - [0:0]\\n:VNETHOOK-DNAT - [0:0]\\n:VNETHOOK-SNAT - [0:0]\\n"
            "-I PREROUTING 1 ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j VNETHOOK-MARK\\n"
            "-I OUTPUT 1 -m addrtype --dst-type LOCAL -j VNETHOOK-MARK\\n"
            "-A VNETHOOK-MARK -j CONNMARK --set-xmark 0x2000000/0x2000000\\n-A VNETHOOK-MARK -j VNETHOOK-DNAT\\n"
            "-A VNETHOOK-MARK -j CONNMARK --set-xmark 0x0/0x2000000\\n"
            "-I POSTROUTING 1 -j VNETHOOK-SNAT\\nCOMMIT\\n").encode())
        out["after"] = [chain_use(4, "filter", "VNETHOOK-FWD"), chain_use(4, "filter", "X"),
                        chain_use(4, "nat", "VNETHOOK-DNAT"), len(chain_rules(4, "filter", "FORWARD")),
                        be._base_in_place(4), be._base_in_place(6)]
        subprocess.run(["iptables-nft", "-t", "nat", "-D", "VNETHOOK-MARK", "3"], check=True)
        out["base rule gone"] = be._base_in_place(4)
        subprocess.run(["iptables-nft", "-t", "nat", "-A", "VNETHOOK-MARK", "-j", "CONNMARK",
                        "--set-xmark", "0x0/0x2000000"], check=True)
        out["restored"] = be._base_in_place(4)
        subprocess.run(["iptables-nft", "-I", "FORWARD", "1", "-j", "DROP"], check=True)
        out["displaced"] = be._base_in_place(4)
        print(json.dumps(out))
    """
    out = in_netns(code)
    assert out["before"] == [None, False]
    # VNETHOOK-FWD: its accept + FORWARD's jump; X: one jump; VNETHOOK-DNAT: MARK's jump
    assert out["after"] == [2, 1, 1, 2, True, False]
    assert (out["base rule gone"], out["restored"]) == (False, True)
    assert out["displaced"] is False


@pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")
def test_removal_by_handle_matches_the_kernel_and_falls_back_on_doubt():
    code = """
        import json, subprocess, sys
        from vnethook.firewall import nfnetlink, iptables_rules as ir
        from vnethook.firewall.iptables_nft import IptablesNftBackend
        from vnethook.model import Forward, guest_key as K
        def fw(dom, fam, port):
            return Forward(domain=dom, mac="52:54:00:00:00:01", network="n", bridge="vbr0",
                subnet="192.0.2.0/24" if fam == 4 else "2001:db8::/64", family=fam,
                guest_address="192.0.2.%d" % (port - 29990) if fam == 4 else "2001:db8::%x" % port,
                protocol="tcp", host_address=None, host_ports=(port, port), guest_ports=(80, 80))
        calls = []
        real = nfnetlink.delete_batch
        def spy(*a, **kw):
            calls.append(real(*a, **kw))
            return calls[-1]
        nfnetlink.delete_batch = spy
        probes = []
        real_probe = nfnetlink.probe_jumps
        def probe(*a, **kw):
            probes.append(real_probe(*a, **kw) is not None)
            return None if not probes[-1] else real_probe(*a, **kw)
        nfnetlink.probe_jumps = probe
        save = lambda: subprocess.run(["iptables-nft-save"], capture_output=True, text=True).stdout + \\
            subprocess.run(["ip6tables-nft-save"], capture_output=True, text=True).stdout
        be = IptablesNftBackend()
        recs = {d: [fw(d, 4, 30000 + i), fw(d, 6, 30100 + i)] for i, d in enumerate(["ga", "gb", "gc"])}
        for d, fws in recs.items():
            be.apply(K(d), fws, None)
        out = {}
        be.remove(K("gb"), recs["gb"])
        text = save()
        out["plain"] = [list(calls), "vnethook:gb" in text, ir.chain_hash(K("gb")) in text,
                        text.count("vnethook:ga"), text.count("vnethook:gc"), list(probes)]
        calls.clear()
        probes.clear()
        # A doubtful jump (an extra match on it) to gc's chain: never deleted by handle.
        own = ir.guest_chain(ir.CHAIN_DNAT, K("gc"))
        subprocess.run(["iptables-nft", "-t", "nat", "-D", "VNETHOOK-DNAT", "-m", "comment", "--comment",
                        "vnethook:" + K("gc"), "-j", own], check=True)
        subprocess.run(["iptables-nft", "-t", "nat", "-A", "VNETHOOK-DNAT", "-s", "198.51.100.0/24", "-m",
                        "comment", "--comment", "vnethook:" + K("gc"), "-j", own], check=True)
        be.remove(K("gc"), recs["gc"])
        text = save()
        out["doubt"] = [list(calls), "vnethook:gc" in text, ir.chain_hash(K("gc")) in text, text.count("vnethook:ga"),
                        list(probes)]
        print(json.dumps(out))
    """
    out = in_netns(code)
    # one transaction per family; gb gone without a trace, the others intact
    # (per family: a DNAT in its own chain + its jump); the handles were
    # found by probing next to the chains' handles, without a dump
    assert out["plain"] == [[True, True], False, False, 4, 4, [True, True]]
    # gc's doubtful IPv4 jump is not deleted by handle; the by-spec delete then
    # fails too (the rule differs from the record), so the listing path removes
    # everything of gc, both families, and nothing else
    assert out["doubt"][0] == []
    assert out["doubt"][1:] == [False, False, 4, [False]]


@pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")
def test_first_guest_builds_the_base_in_its_batch_as_the_listing_path_would():
    """The first guest (no base yet) takes the fast path, which creates the
    base itself: the kernel then holds exactly what the listing path
    builds, removal gives back exactly libvirt's rules; after the tables
    were deleted under a recorded guest (firewalld's reload) the fast path
    puts everything back, not only the base; and a base that exists after
    all (a wrong guess) fails that batch and the listing path converges.
    In a private network namespace, with libvirt's rules."""
    code = """
        import json, subprocess, sys
        from forward_factory import fwd
        from vnethook.firewall.iptables_nft import IptablesNftBackend
        R = %r
        for tool, f in (("iptables-nft-restore", "libvirt-iptables-v4.rules"),
                        ("ip6tables-nft-restore", "libvirt-iptables-v6.rules")):
            subprocess.run([tool], stdin=open(R + "/" + f), check=True)

        def save():
            return "".join(subprocess.run([t], capture_output=True, text=True, check=True).stdout
                           for t in ("iptables-nft-save", "ip6tables-nft-save"))

        def rules(text):
            return sorted(l for l in text.splitlines() if l and l[0] in "-:" and "[" not in l
                          ) + sorted(l.split(" [")[0] for l in text.splitlines() if l.startswith(":"))

        fws = [fwd(bridge="virbr9"), fwd(bridge="virbr9", protocol="udp", host_ports=(53, 53), guest_ports=(53, 53)),
               fwd(bridge="virbr9", family=6, subnet="2001:db8::/64", guest_address="2001:db8::10")]
        key = fws[0].key
        be = IptablesNftBackend()
        clean = rules(save())
        out = {"absent": [be._base_absent(4), be._base_absent(6)]}
        tried = []
        real_slow = be.list_owned  # the slow path starts with the guest's listing
        be.list_owned = lambda k, w: (tried.append("slow"), real_slow(k, w))[1]
        be.apply(key, fws, [])
        out["fast"] = tried == []
        fast = rules(save())
        out["present"] = [be._base_absent(4), be._base_absent(6)]
        be.remove(key, fws)
        out["clean after remove"] = rules(save()) == clean
        be.apply(key, fws, None)
        out["same as listing path"] = rules(save()) == fast
        # firewalld's reload: every iptables-nft table deleted, libvirt puts
        # its own rules back, the record is unchanged: the fast path must
        # add everything again, not only the base
        for fam in ("ip", "ip6"):
            for table in ("filter", "nat", "mangle"):
                subprocess.run(["nft", "delete", "table", fam, table], capture_output=True)
        for tool, f in (("iptables-nft-restore", "libvirt-iptables-v4.rules"),
                        ("ip6tables-nft-restore", "libvirt-iptables-v6.rules")):
            subprocess.run([tool], stdin=open(R + "/" + f), check=True)
        tried.clear()
        be.apply(key, fws, fws)
        out["after a flush"] = [tried == [], rules(save()) == fast]
        # the base exists, yet the fast path is told it does not: -N fails, listing converges
        be._base_absent = lambda fam: True
        be.apply(key, fws[1:], fws)
        v4 = subprocess.run(["iptables-nft-save"], capture_output=True, text=True, check=True).stdout
        out["wrong guess converged"] = tried == ["slow"] and "8080" not in v4 and "dport 53" in v4
        be.remove(key, fws[1:])
        out["clean at the end"] = rules(save()) == clean
        print(json.dumps(out))
    """ % RULESETS
    out = in_netns(code)
    assert out == {"absent": [True, True], "fast": True, "present": [False, False], "clean after remove": True,
                   "same as listing path": True, "after a flush": [True, True], "wrong guess converged": True,
                   "clean at the end": True}, out


@pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")
def test_netlink_table_check_and_the_reused_query_socket():
    """table_exists answers True/False from the kernel (not "unknown"), and
    the one query socket is reused across requests, also after a request
    for a chain that does not exist (no socket per question: each close
    after a deletion would wait for an RCU grace period)."""
    code = """
        import json, os, subprocess, sys
        from vnethook.firewall import nfnetlink as nl, others
        out = {"before": [nl.table_exists(4, "filter"), nl.table_exists(6, "filter"), sorted(others._nft_filter_tables())]}
        subprocess.run(["iptables-nft", "-A", "FORWARD", "-o", "virbr9", "-j", "REJECT"], check=True)
        out["after"] = [nl.table_exists(4, "filter"), nl.table_exists(6, "filter"), sorted(others._nft_filter_tables())]
        out["untouched"] = others._covered_nft_untouched(4)
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            nl.chain_rules(4, "filter", "NOPE"); nl.chain_use(4, "filter", "NOPE"); nl.table_exists(4, "nat")
        out["fds grew"] = len(os.listdir("/proc/self/fd")) - fds
        out["still answers"] = [len(nl.chain_rules(4, "filter", "FORWARD")), nl.chain_use(4, "filter", "FORWARD")]
        subprocess.run(["iptables-nft", "-N", "DOCKER-USER"], check=True)
        subprocess.run(["iptables-nft", "-I", "FORWARD", "1", "-j", "DOCKER-USER"], check=True)
        out["docker"] = others._covered_nft_untouched(4)
        subprocess.run(["iptables-nft", "-D", "FORWARD", "-j", "DOCKER-USER"], check=True)
        subprocess.run(["iptables-nft", "-A", "DOCKER-USER", *others.accept_spec().replace('"', "").split()], check=True)
        out["stale copy"] = others._covered_nft_untouched(4)
        print(json.dumps(out))
    """
    out = in_netns(code)
    assert out == {"before": [False, False, []], "after": [True, False, [4]], "untouched": True, "fds grew": 0,
                   "still answers": [1, 1], "docker": False, "stale copy": False}, out


@pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")
def test_the_hairpin_check_by_netlink_keeps_the_restore_run_off_other_guests_rules():
    """A started guest's batch names its subnet's hairpin only when netlink
    did not find it in VNETHOOK-SNAT (a `-C` line makes iptables-nft-restore
    fetch every rule of every chain the batch names: VNETHOOK-DNAT holds a
    jump per guest). Found for both families and byte-aligned or not
    prefixes; not found once deleted, nor for another subnet; and then the
    batch checks it, fails, and the slow path puts it back."""
    code = """
        import json, subprocess, sys
        from forward_factory import fwd
        from vnethook.firewall import iptables_rules as ir
        from vnethook.firewall.iptables_nft import IptablesNftBackend
        be = IptablesNftBackend()
        fw = [fwd(), fwd(family=6, subnet="2001:db8:1::/64", guest_address="2001:db8:1::10"),
              fwd(domain="db", subnet="198.51.100.0/25", guest_address="198.51.100.10", host_ports=(9000, 9000))]
        out = {}
        for f in fw:
            be.apply(f.key, [f], [])
        def shared(f):
            return [r for r in be.render(f.key, [f]) if ir.is_shared(r)]
        out["found"] = [be._shared_in_place(f.family, shared(f)) for f in fw]
        other = fwd(domain="x", subnet="198.51.100.128/25", guest_address="198.51.100.130")
        out["other subnet"] = be._shared_in_place(4, shared(other))
        spec = shared(fw[0])[0].split(" -A VNETHOOK-SNAT ", 1)[1]
        subprocess.run(["iptables-nft", "-t", "nat", "-D", "VNETHOOK-SNAT", *spec.replace('"', "").split()], check=True)
        out["deleted"] = be._shared_in_place(4, shared(fw[0]))
        be.remove(fw[0].key, [fw[0]])
        be.apply(fw[0].key, [fw[0]], [])  # the fast path's check fails the batch; the slow path repairs
        out["repaired"] = be._shared_in_place(4, shared(fw[0]))
        print(json.dumps(out))
    """
    out = in_netns(code)
    assert out == {"found": [True, True, True], "other subnet": False, "deleted": False, "repaired": True}, out
