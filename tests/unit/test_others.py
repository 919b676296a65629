"""Where our accept goes in other managers' FORWARD chains, and what status says.

Pure functions over `iptables-save -t filter` listings shaped like Docker's
(20.10 and 28+), ufw's and an admin's own.
"""

from __future__ import annotations

from vnethook.firewall import others

SPEC = others.accept_spec()

DOCKER = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"""

UFW = """*filter
:FORWARD DROP [0:0]
:ufw-before-forward - [0:0]
:ufw-reject-forward - [0:0]
-A FORWARD -j ufw-before-forward
-A FORWARD -j ufw-reject-forward
-A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ufw-reject-forward -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""

PLAIN = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def with_rule(text, chain, first=True):
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith("-A")) if first else lines.index("COMMIT")
    return "\n".join(lines[:i] + [f"-A {chain} {SPEC}"] + lines[i:]) + "\n"


def test_docker_gets_it_first_in_docker_user_and_it_stays_put():
    v = others.parse(DOCKER)
    assert others.placement(v) == "DOCKER-USER"
    assert others.changes(v, active=True) == [f"-I DOCKER-USER 1 {SPEC}"]
    assert others.verdict(v, "nft", 4) == "dropped: iptables-nft filter FORWARD policy DROP, set by Docker"
    done = others.parse(with_rule(DOCKER, "DOCKER-USER"))
    assert others.changes(done, active=True) == []
    assert others.verdict(done, "nft", 4) is None
    # An iptables backend of the same flavour needs it there too (its own jump may sit below Docker's).
    assert others.changes(v, active=True, covered=True) == [f"-I DOCKER-USER 1 {SPEC}"]
    assert others.changes(done, active=False) == [f"-D DOCKER-USER {SPEC}"]


def test_a_rule_below_return_in_docker_user_is_moved_up():
    v = others.parse(with_rule(DOCKER, "DOCKER-USER", first=False))  # after `-j RETURN`... last line
    assert others.changes(v, active=True) == [f"-D DOCKER-USER {SPEC}", f"-I DOCKER-USER 1 {SPEC}"]


def test_ufw_gets_it_at_the_head_of_forward_ahead_of_its_reject():
    v = others.parse(UFW)
    assert others.placement(v) == "FORWARD"
    assert others.changes(v, active=True) == [f"-I FORWARD 1 {SPEC}"]
    assert others.changes(v, active=True, covered=True) == []  # our own jump serves FORWARD
    assert others.verdict(v, "nft", 6).startswith("dropped: ip6tables-nft filter ufw-reject-forward: -j REJECT")
    done = others.parse(with_rule(UFW, "FORWARD"))
    assert others.changes(done, active=True) == [] and others.verdict(done, "nft", 4) is None
    # ufw re-inserted its jumps above ours: its reject now comes first.
    lines = UFW.replace("-A FORWARD -j ufw-reject-forward\n", "-A FORWARD -j ufw-reject-forward\n" + f"-A FORWARD {SPEC}\n")
    moved = others.parse(lines)
    assert others.changes(moved, active=True) == [f"-D FORWARD {SPEC}", f"-I FORWARD 1 {SPEC}"]


def test_ahead_of_time_where_the_flavour_has_a_forward_chain():
    """No manager yet: the accept still goes to the head of FORWARD, so a
    Docker or ufw started later under running guests cannot cut them."""
    v = others.parse(PLAIN)
    assert others.placement(v) == "FORWARD"
    assert others.changes(v, active=True) == [f"-I FORWARD 1 {SPEC}"]
    assert others.changes(v, active=True, covered=True) == []  # an iptables backend's own jump serves
    assert others.verdict(v, "legacy", 4) is None
    # Docker starts later: its jumps above ours, policy DROP; ours still accepts first.
    later = others.parse(with_rule(PLAIN, "FORWARD", first=False).replace(":FORWARD ACCEPT", ":FORWARD DROP")
                         .replace(f"-A FORWARD {SPEC}", f"-A FORWARD -j DOCKER-USER\n-A FORWARD {SPEC}")
                         .replace(":OUTPUT", ":DOCKER-USER - [0:0]\n:OUTPUT")
                         .replace("COMMIT", "-A DOCKER-USER -j RETURN\nCOMMIT"))
    assert others.verdict(later, "nft", 4) is None


def test_nothing_where_the_flavour_has_no_filter_table():
    assert others.parse("") is None and others.changes(None, True) == []


def test_culprit_ignores_rules_kept_off_guest_bridges_and_follows_jumps():
    v = others.parse(DOCKER)
    assert others.culprit(v, "FORWARD") is None  # docker0-only drops
    admin = others.parse(DOCKER.replace("-A FORWARD -j DOCKER-USER\n", "-A FORWARD -j DOCKER-USER\n-A FORWARD -j ADMIN\n")
                         .replace(":DOCKER-USER - [0:0]\n", ":DOCKER-USER - [0:0]\n:ADMIN - [0:0]\n")
                         .replace("COMMIT", "-A ADMIN -p tcp -m tcp --dport 8080 -j DROP\nCOMMIT"))
    assert others.culprit(admin, "FORWARD") == "ADMIN: -p tcp -m tcp --dport 8080 -j DROP"
    bridged = others.parse(PLAIN.replace("COMMIT", "-A FORWARD -o virbr0 -j REJECT\nCOMMIT"))
    assert others.culprit(bridged, "FORWARD", bridges=["virbr0"]) == "FORWARD: -o virbr0 -j REJECT"
    assert others.culprit(bridged, "FORWARD", bridges=["virbr1"]) is None
    loop = others.parse(PLAIN.replace(":OUTPUT", ":A - [0:0]\n:OUTPUT").replace("COMMIT", "-A FORWARD -j A\n-A A -j A\nCOMMIT"))
    assert others.culprit(loop, "FORWARD") is None  # bounded depth, no recursion error


def test_verdict_is_left_to_the_backend_for_its_own_flavour():
    assert others.verdict(others.parse(UFW), "nft", 4, jump_first=True) is None
