"""`check` and `status` say when a forward takes a port the host itself serves.

A real listener in the host namespace (an sshd stand-in on 22, a database on
127.0.0.1:5432); the map forwards 22 on every address and 5432 on loopback.
"""

from __future__ import annotations

import json


def test_check_and_status_name_the_ports_the_host_serves(host):
    if host.backend != "nftables":
        import pytest

        pytest.skip("one backend is enough: the warning does not depend on it")
    host.topo.server("host", "sshd", "22")
    host.topo.server("host", "db", "5432", bind4="127.0.0.1")
    host.write_map({"g0": "{address: 192.0.2.10, forward: [22:22, '127.0.0.1:5432:5432', 8080:80]}"})
    p = host.cli("check")
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    assert "listens on *:22/tcp" in err and "5432/tcp; this forward (127.0.0.1:5432)" in err, err
    assert "8080" not in err and err.count("warning:") == 2
    assert "ports.yaml:" in err  # says where
    s = host.cli("status", "--json")
    warnings = json.loads(s.stdout)["warnings"]
    assert len(warnings) == 2 and all("takes that port away" in w for w in warnings)
