"""The whole hook under random input: exit 0, no traceback, nothing on stdout.

libvirt hands the hook whatever argv and stdin it has; stdout of some
events replaces the domain XML, and a non-zero exit can abort a start or
kill a running guest. So for any argv and any bytes on stdin, with a map
that configures nobody (and with one that configures the fixture guest),
`vnethook.hook.main` must return 0, print nothing to fd 1 and no traceback
to fd 2.

The hook may reach the firewall (network `started` ensures the base), so
the property runs in a child pytest inside a private network namespace
(`unshare --net`); the outer test only starts it and reads its verdict.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIX = os.path.join(REPO, "tests", "fixtures", "libvirt-11.3")
INNER = os.environ.get("VNETHOOK_HOSTILE_FUZZ_INNER") == "1"
EXAMPLES = int(os.environ.get("VNETHOOK_HOSTILE_FUZZ_EXAMPLES", "400"))


@pytest.mark.skipif(INNER, reason="outer driver")
def test_hook_fuzz_in_private_netns():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private network namespace")
    env = dict(os.environ, VNETHOOK_HOSTILE_FUZZ_INNER="1", PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-k", "inner", os.path.abspath(__file__)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert " passed" in p.stdout and "skipped" not in p.stdout.splitlines()[-1], p.stdout[-2000:]


def _samples():
    """The captured hook calls: (kind, name, op, rest, stdin), e.g. from
    `06-qemu-web1-started-begin-_.xml`."""
    out = []
    for f in sorted(os.listdir(os.path.join(FIX, "hooks"))):
        if f.endswith(".xml"):
            _, kind, name, op, *rest = f[:-4].split("-")
            with open(os.path.join(FIX, "hooks", f), "rb") as fh:
                out.append((kind, name, op.replace("_", "-"), [r.replace("_", "-") for r in rest], fh.read()))
    return out


QEMU_OPS = ["prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach"]
NET_OPS = ["start", "started", "stopped", "port-created", "port-deleted", "updated", "plugged", "unplugged"]


def _fuzz(tmp_root: str, configured: bool):
    from hypothesis import HealthCheck, given, settings, strategies as st

    from vnethook import hook

    calls = _samples()
    samples = [c[4] for c in calls]
    cfg = os.path.join(tmp_root, "etc")
    state = os.path.join(tmp_root, "state")
    root = os.path.join(tmp_root, "libvirt")
    os.makedirs(cfg, mode=0o755)
    os.chmod(cfg, 0o755)
    os.makedirs(os.path.join(root, "run/libvirt/qemu"))
    os.makedirs(os.path.join(root, "run/libvirt/network"))
    os.makedirs(os.path.join(root, "var/lib/libvirt/dnsmasq"))
    if configured:
        shutil.copy(os.path.join(FIX, "run-qemu-web1.xml"), os.path.join(root, "run/libvirt/qemu/web1.xml"))
        shutil.copy(os.path.join(FIX, "run-network-vnhnet.iptables.xml"),
                    os.path.join(root, "run/libvirt/network/vnhnet.xml"))
        shutil.copy(os.path.join(FIX, "vnhbr0.status"), os.path.join(root, "var/lib/libvirt/dnsmasq/vnhbr0.status"))
        text = ("settings: {lease_watch: off}\nguests:\n  web1: [8080:80, 5353:53/udp]\n"
                "  web2: {address: 192.0.2.10, forward: [2222:22]}\n")
    else:
        text = ""
    with open(os.path.join(cfg, "ports.yaml"), "w") as f:
        f.write(text)
    os.chmod(os.path.join(cfg, "ports.yaml"), 0o644)
    os.environ.update(VNETHOOK_CONFIG=cfg, VNETHOOK_STATE_DIR=state, VNETHOOK_LIBVIRT_ROOT=root,
                      VNETHOOK_LOG="stderr")

    def mutate(data: bytes, seed: int) -> bytes:
        r = random.Random(seed)
        b = bytearray(data)
        for _ in range(r.randint(0, 4)):
            op = r.randrange(4)
            if op == 0 and b:
                del b[r.randrange(len(b)):]  # truncate
            elif op == 1 and b:
                b[r.randrange(len(b))] = r.randrange(256)  # flip a byte
            elif op == 2 and b:
                i = r.randrange(len(b))
                b[i:i] = r.choice([b"<", b">", b"&", b"\x00", b"'", b"<mac address='zz'/>", b"]]>"])
            elif op == 3 and b:
                i, j = sorted(r.randrange(len(b)) for _ in range(2))
                del b[i:j]
        return bytes(b)

    names = st.one_of(st.sampled_from(["web1", "web1", "web2", "vnhnet", "vnhnet", "-", ""]), st.text(max_size=40))
    stdin = st.one_of(
        st.binary(max_size=2048),
        st.sampled_from(samples),
        st.tuples(st.sampled_from(samples), st.integers(0, 2**32)).map(lambda t: mutate(*t)),
    )
    events = st.one_of(
        st.tuples(st.just("qemu"), st.sampled_from(QEMU_OPS)),
        st.tuples(st.just("network"), st.sampled_from(NET_OPS)),
        st.tuples(st.sampled_from(["qemu", "network", "lxc", ""]),
                  st.one_of(st.sampled_from(QEMU_OPS + NET_OPS), st.text(max_size=12))),
    )
    rest = st.one_of(st.just(["begin", "-"]), st.lists(st.text(max_size=20), max_size=4))

    # Real calls, their stdin intact or mutated: the paths that change rules.
    real = st.tuples(st.sampled_from(calls), st.integers(0, 2**32), st.booleans()).map(
        lambda t: (t[0][0], t[0][1], t[0][2], t[0][3], mutate(t[0][4], t[1]) if t[2] else t[0][4]))
    random_call = st.tuples(events, names, rest, stdin).map(lambda t: (t[0][0], t[1], t[0][1], t[2], t[3]))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
              suppress_health_check=list(HealthCheck))
    @given(call=st.one_of(real, random_call))
    def prop(call):
        kind, name, op, rest, data = call
        argv = ["hook", name, op, *rest] if op or rest else ["hook", name]
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        real_out, real_err = sys.stdout, sys.stderr
        # Python-level writes must land on the fds too (pytest swaps sys.std*).
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), write_through=True)
        try:
            rc = hook.main(kind, argv, stdin=io.BytesIO(data))
        finally:
            for f in (sys.stdout, sys.stderr):
                f.flush()
                f.close()
            sys.stdout, sys.stderr = real_out, real_err
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        o, e = out.read(), err.read()
        assert rc == 0, (argv, e[-2000:])
        assert o == b"", (argv, o[:500])
        assert b"Traceback" not in e, (argv, e[-3000:])

    prop()


@pytest.mark.skipif(not INNER, reason="runs inside the private netns only")
def test_inner_hook_fuzz_empty_map(tmp_path):
    _fuzz(str(tmp_path), configured=False)


@pytest.mark.skipif(not INNER, reason="runs inside the private netns only")
def test_inner_hook_fuzz_configured_guest(tmp_path):
    _fuzz(str(tmp_path), configured=True)
