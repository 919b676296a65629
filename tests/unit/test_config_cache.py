"""The compiled cache: hooks with an unchanged map never import yaml.

The subprocess tests run the real interpreter the hooks use, because "yaml
is not imported" and "how long it takes" are only meaningful in a fresh one.
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import time

import pytest

import vnethook.config as config
from vnethook.config import ConfigError, guest_names_fast, load_config_cached, on_error_hint
from vnethook.paths import Paths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MAP = "settings: {on_error: block}\nguests:\n  web1: [8080:80]\n"


def write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


@pytest.fixture
def env(tmp_path):
    d = tmp_path / "etc"
    (d / "ports.d").mkdir(parents=True)
    os.chmod(d, 0o755)
    os.chmod(d / "ports.d", 0o755)
    write(d / "ports.yaml", MAP)
    return Paths(config=str(d), libvirt_root="/", state_dir=str(tmp_path / "run" / "vnethook"))


@pytest.fixture
def slow_loads(monkeypatch):
    """Count how often the real (yaml) loader runs."""
    calls = []
    real = config._load

    def counting(paths):
        calls.append(paths.config)
        return real(paths)

    monkeypatch.setattr(config, "_load", counting)
    return calls


def test_cache_is_created_private_and_reused(env, slow_loads):
    first = load_config_cached(env)
    assert slow_loads == [env.config]
    st = os.stat(env.state_dir)
    assert st.st_mode & 0o777 == 0o700
    assert os.stat(env.config_cache).st_mode & 0o777 == 0o600
    second = load_config_cached(env)
    assert slow_loads == [env.config]
    assert second == first
    assert second.guests["web1"].forwards[0].host_ports == (8080, 8080)


def test_cache_blob_is_plain_marshal_data(env):
    load_config_cached(env)
    with open(env.config_cache, "rb") as f:
        blob = marshal.loads(f.read())

    def plain(x):
        if isinstance(x, (tuple, list)):
            return all(plain(i) for i in x)
        if isinstance(x, dict):
            return all(plain(k) and plain(v) for k, v in x.items())
        return x is None or isinstance(x, (str, int, bytes, bool))

    assert plain(blob)


def test_edit_with_new_mtime_invalidates(env, slow_loads):
    load_config_cached(env)
    f = os.path.join(env.config, "ports.yaml")
    write(f, MAP.replace("8080:80", "8081:80"))
    later = time.time() + 10
    os.utime(f, (later, later))
    cfg = load_config_cached(env)
    assert len(slow_loads) == 2
    assert cfg.guests["web1"].forwards[0].host_ports == (8081, 8081)


def test_same_size_edit_right_after_caching_is_seen(env):
    """Coarse timestamps can leave mtime unchanged; recent files are compared by content."""
    f = os.path.join(env.config, "ports.yaml")
    st = os.stat(f)
    load_config_cached(env)
    write(f, MAP.replace("8080:80", "8081:80"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert load_config_cached(env).guests["web1"].forwards[0].host_ports == (8081, 8081)


def test_new_dropin_invalidates(env, slow_loads):
    load_config_cached(env)
    write(os.path.join(env.config, "ports.d", "10-db.yaml"), "guests:\n  db1: [6379:6379]\n")
    assert set(load_config_cached(env).guests) == {"web1", "db1"}
    assert len(slow_loads) == 2


def test_removed_dropin_invalidates(env, slow_loads):
    extra = os.path.join(env.config, "ports.d", "10-db.yaml")
    write(extra, "guests:\n  db1: [6379:6379]\n")
    assert set(load_config_cached(env).guests) == {"web1", "db1"}
    os.unlink(extra)
    assert set(load_config_cached(env).guests) == {"web1"}
    assert len(slow_loads) == 2


def test_chmod_invalidates_so_permissions_are_rechecked(env):
    load_config_cached(env)
    f = os.path.join(env.config, "ports.yaml")
    os.chmod(f, 0o666)
    with pytest.raises(ConfigError) as e:
        load_config_cached(env)
    assert str(e.value) == f"{f}: refusing: writable by group and others (chmod go-w {f})"


def test_broken_edit_raises_even_with_warm_cache_and_keeps_last_good(env):
    load_config_cached(env)
    with open(env.config_cache, "rb") as fh:
        good_blob = fh.read()
    f = os.path.join(env.config, "ports.yaml")
    write(f, "settings: {on_error: block}\nguests:\n  web1: [8080:80\n")
    with pytest.raises(ConfigError) as e:
        load_config_cached(env)
    assert e.value.problems[0].file == f
    with open(env.config_cache, "rb") as fh:
        assert fh.read() == good_blob  # a broken map is never cached
    with pytest.raises(ConfigError):
        load_config_cached(env)  # and stays broken on the next event


def test_corrupt_or_untrusted_cache_is_ignored(env, slow_loads):
    load_config_cached(env)
    with open(env.config_cache, "wb") as f:
        f.write(b"\x00garbage")
    assert "web1" in load_config_cached(env).guests
    assert len(slow_loads) == 2
    os.chmod(env.config_cache, 0o666)  # someone else could have written it
    assert "web1" in load_config_cached(env).guests
    assert len(slow_loads) == 3
    assert os.stat(env.config_cache).st_mode & 0o777 == 0o600


def test_unwritable_state_dir_still_loads(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = Paths(config=env.config, libvirt_root="/", state_dir=str(blocker / "sub"))
    assert "web1" in load_config_cached(p).guests


def test_guest_names_fast(env):
    assert guest_names_fast(env) is None  # cold
    load_config_cached(env)
    assert guest_names_fast(env) == frozenset({"web1"})
    write(os.path.join(env.config, "ports.d", "10-db.yaml"), "guests:\n  db1: [6379:6379]\n")
    assert guest_names_fast(env) is None  # stale


# --- on_error_hint


def test_hint_from_valid_map(env):
    assert on_error_hint(env) == "block"
    write(os.path.join(env.config, "ports.yaml"), "guests: {}\n")
    assert on_error_hint(env) == "warn"


def test_hint_when_map_composes_but_is_invalid(env):
    write(os.path.join(env.config, "ports.yaml"), "settings: {on_error: block}\nguests:\n  web1: [0:80]\n")
    assert on_error_hint(env) == "block"


def test_hint_when_yaml_is_broken_uses_last_good(env):
    load_config_cached(env)  # last good: block
    write(os.path.join(env.config, "ports.yaml"), "guests:\n  web1: [8080:80\n")
    assert on_error_hint(env) == "block"


def test_hint_when_yaml_is_broken_and_no_cache_scans_text(env):
    write(os.path.join(env.config, "ports.yaml"), "settings:\n  on_error: block\nguests:\n\tweb1: [8080:80]\n")
    assert not os.path.exists(env.config_cache)
    assert on_error_hint(env) == "block"
    write(os.path.join(env.config, "ports.yaml"), "settings:\n  # on_error: block\nguests:\n\tweb1: []\n")
    assert on_error_hint(env) == "warn"


# --- real interpreter: no yaml, and cheap


def _run(env, code, extra_env=None):
    e = dict(os.environ)
    e.update(
        PYTHONPATH=ROOT,
        VNETHOOK_CONFIG=env.config,
        VNETHOOK_STATE_DIR=env.state_dir,
        **(extra_env or {}),
    )
    out = subprocess.run([PY, "-c", code], env=e, capture_output=True, text=True, check=True)
    return out.stdout.strip()


PROBE = (
    "import sys\n"
    "from vnethook.config import load_config_cached\n"
    "from vnethook.paths import get_paths\n"
    "c = load_config_cached(get_paths())\n"
    "print(sorted(c.guests), [m for m in ('yaml', 'ipaddress', 'difflib') if m in sys.modules])\n"
)


def test_warm_cache_does_not_import_yaml(env):
    write(os.path.join(env.config, "ports.yaml"), MAP.replace("8080:80", "203.0.113.10:8080:80"))
    assert _run(env, PROBE) == "['web1'] ['yaml', 'ipaddress']"  # cold: builds the cache
    assert _run(env, PROBE) == "['web1'] []"
    write(os.path.join(env.config, "ports.d", "10-db.yaml"), "guests:\n  db1: [6379:6379]\n")
    assert _run(env, PROBE) == "['db1', 'web1'] ['yaml', 'ipaddress']"
    assert _run(env, PROBE) == "['db1', 'web1'] []"


def test_warm_cache_costs_little_over_importing_paths(env, tmp_path):
    """The product budget is < 2 ms on top of what the hook imports anyway
    (vnethook.paths, which already pulls in dataclasses). Measured here with
    real bytecode caching; the assertion leaves headroom for a loaded machine."""
    timing = (
        "import time\n"
        "import vnethook.paths\n"
        "t = time.perf_counter()\n"
        "from vnethook.config import load_config_cached\n"
        "load_config_cached(vnethook.paths.get_paths())\n"
        "print(time.perf_counter() - t)\n"
    )
    extra = {"PYTHONPYCACHEPREFIX": str(tmp_path / "pyc"), "PYTHONDONTWRITEBYTECODE": ""}
    _run(env, timing, extra)  # writes .pyc and the cache
    best = min(float(_run(env, timing, extra)) for _ in range(7))
    print(f"warm config load: {best * 1000:.2f} ms")
    assert best < 0.004, f"warm config load took {best * 1000:.2f} ms"


def test_the_cached_map_builds_only_the_guests_asked_for(env):
    """From the cache, Config.guests is a read-only mapping equal to the
    parsed map's dict, building a guest's objects only when it is asked for
    (a hook wants one guest of a map of any size)."""
    write(os.path.join(env.config, "ports.d", "many.yaml"),
          "guests:\n" + "".join(f"  g{i}:\n    forward: ['{9000 + i}:80']\n" for i in range(50)))
    parsed = config.load_config(env)
    load_config_cached(env)
    cached = load_config_cached(env)
    guests = cached.guests
    assert not isinstance(guests, dict) and guests._built == {}
    assert guests["g7"] == parsed.guests["g7"] and list(guests._built) == ["g7"]
    assert "g49" in guests and "nope" not in guests and guests.get("nope") is None and len(guests) == 51
    assert list(guests) == list(parsed.guests)
    assert cached == parsed and dict(guests) == parsed.guests
    with pytest.raises(TypeError):
        guests["g1"] = None  # type: ignore[index]


def test_the_worker_loads_the_blob_the_hooks_check_validated(env, monkeypatch):
    """The hook checks the cache (checked_cache), then its worker loads the
    map from that blob without reading and checking the files again; a
    load without it checks anew."""
    load_config_cached(env)
    blob = config.checked_cache(env)
    assert blob is not None and config.fast_view(env, blob) == (frozenset({"web1"}), "block")
    reads = []
    real = config._read_cache
    monkeypatch.setattr(config, "_read_cache", lambda p: reads.append(1) or real(p))
    write(os.path.join(env.config, "ports.yaml"), MAP.replace("8080", "8081"))  # after the check
    first = load_config_cached(env, blob)
    assert reads == [] and first.guests["web1"].forwards[0].host_ports == (8080, 8080)
    second = load_config_cached(env)
    assert reads == [1] and second.guests["web1"].forwards[0].host_ports == (8081, 8081)
