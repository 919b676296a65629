"""Orchestration: plan -> backend -> record, under one lock.

The engine is the only place that connects the pure parts (config, libvirt
readers, plan) with the side-effecting ones (firewall backends, sysctl,
state). Hooks, sync, the lease waiter and the CLI all go through it, so
every path follows the same write-ahead discipline:

  record(pending) -> backend.apply/remove (atomic) -> record(final)

The engine is also the only place with a diff between what is installed
and what the plan wants. The record holds *inputs* (the forwards applied,
the backend, its layout), so the engine needs no backend's syntax: it
hands the recorded forwards to the backend as `previous` (or None: find by
tag, when the record is pending, refused, or of another layout), and asks
the backend to render them when it compares with a listing (sync, status,
repair). The diff, fast path vs slow path, retry, rollback and teardown
live in firewall/converge.py (Backend.apply/remove); what remains per firewall is
a driver (firewall/base.py): its syntax, listing and commits.
"""

from __future__ import annotations

import os
import time

from vnethook import log, state
from vnethook.fsutil import atomic_write
from vnethook.lock import Lock
from vnethook.model import guest_key


class StateDirError(Exception):
    """The state directory cannot be used safely; the message says why and what to do."""


class SyncReport:
    def __init__(self):
        self.applied = []  # domains whose rules changed
        self.removed = []  # domains/keys whose rules were removed
        self.unchanged = 0
        self.waiting = {}  # domain -> reasons
        self.problems = []  # what the plans cannot honour (e.g. an address another MAC leases)
        self.errors = []


class Engine:
    def __init__(self, paths, config=None):
        self.paths = paths
        self.config = config  # the YAML map, with the running guests' metadata once read
        self.metadata_problems: dict = {}  # domain -> what its metadata cannot have
        self._backends = {}
        self._selected = None

    # ----------------------------------------------------------- backend
    def selected_backend(self, redetect: bool = False) -> tuple:
        """(name, reason) of the backend to use for new rules."""
        if self._selected and not redetect:
            return self._selected
        setting = self.config.settings.firewall if self.config else self._configured_firewall()
        if setting != "auto":
            self._selected = (setting, "settings.firewall in the port map")
            return self._selected
        self._selected = _detect_cached(self.paths, redetect)
        return self._selected

    def _configured_firewall(self) -> str:
        """settings.firewall even on the paths that run without the map.

        `stopped` works from the record alone, but when the record is lost
        or corrupt the rules must be looked for in the firewall the map
        chose, not the one detection would pick (a host whose map says
        iptables-legacy while /usr/sbin/iptables is nft would orphan them).
        """
        try:
            from vnethook.config import load_config_cached

            return load_config_cached(self.paths).settings.firewall
        except Exception:
            return "auto"

    def backend(self, name: str | None = None):
        name = name or self.selected_backend()[0]
        b = self._backends.get(name)
        if b is None:
            from vnethook.firewall import get_backend

            b = get_backend(name)
            self._backends[name] = b
        return b

    # ------------------------------------------------------------ guests
    def plan_domain(self, domain, hook_network=None, now: float | None = None):
        """Plan one running domain from config, libvirt files and leases."""
        from vnethook import libvirt
        from vnethook.plan import plan_guest

        guest = self.config.guests.get(domain.name) if self.config else None
        if guest is None:
            return None
        networks = libvirt.networks_for(self.paths, domain, hook_network)
        leases = {}
        for nic in domain.interfaces:
            net = networks.get(nic.network) if nic.network else None
            bridge = nic.bridge or (net.bridge if net else None)
            if bridge and bridge not in leases:
                try:
                    leases[bridge] = libvirt.read_leases(self.paths.lease_file(bridge), now=now or time.time())
                except libvirt.LibvirtDataError as e:
                    log.warning(f"ignoring unreadable leases: {e}", DOMAIN=domain.name)
                    leases[bridge] = []
        return plan_guest(guest, domain, networks, leases, now=now or time.time())

    def apply_domain(self, domain, hook_network=None, event: str = "") -> object:
        """Bring one running domain's forwards in line with its plan."""
        key = guest_key(domain.name)
        if self.config is None or domain.name not in self.config.guests:
            # Not (or no longer) in the map: take away what we added earlier.
            if state.exists(self.paths, key):
                self.remove_guest(domain.name, reason=f"{event}: guest no longer in the port map")
            return None
        with Lock(self.paths.lock_file):
            # Leases are read under the lock, so a concurrent watcher's newer
            # view is never overwritten by an older one.
            plan = self.plan_domain(domain, hook_network)
            for err in plan.errors:
                log.error(err, DOMAIN=domain.name)
            for w in plan.waiting:
                log.info(f"waiting: {w}", DOMAIN=domain.name)
            self._converge(key, domain.name, list(plan.forwards), list(plan.waiting), event)
            self._retry_removals(skip=key)
        return plan

    def remove_guest(self, domain_name: str, reason: str = "", key: str | None = None) -> bool:
        """Remove a guest's forwards, working only from the record.

        The removal is marked pending first (state.mark_removal): if it
        cannot happen now (lock timeout, firewall error), the next event,
        sync or the lease watcher retries it.
        """
        key = key or guest_key(domain_name)
        state.mark_removal(self.paths, key, domain_name)
        with Lock(self.paths.lock_file):
            done = self._remove_locked(key, reason)
            self._retry_removals(skip=key)
            return done

    def remove_macs(self, domain_name: str, macs: list, reason: str = "") -> None:
        """Drop the forwards that point at NICs that went away (unplug)."""
        key = guest_key(domain_name)
        macs = [m.lower() for m in macs]
        state.mark_removal(self.paths, key, domain_name, macs)
        with Lock(self.paths.lock_file):
            self._remove_macs_locked(key, domain_name, macs, reason)
            self._retry_removals(skip=key)

    def _remove_macs_locked(self, key: str, domain_name: str, macs: list, reason: str) -> None:
        rec = self._read_record(key)
        if rec is None:
            if state.exists(self.paths, key):  # corrupt: all of it goes, found by tag
                self._remove_locked(key, reason)
            state.clear_removal(self.paths, key)
            return
        keep = [f for f in state.forwards_of(rec) if f.mac not in set(macs)]
        self._converge(key, domain_name, keep, list(rec.get("waiting") or ()), reason)

    def _retry_removals(self, skip: str | None = None) -> None:
        """Retry the removals that failed earlier (under the lock).

        A guest that runs again is left to its own events and sync (its
        converge replaces the old rules), except for NICs still unplugged.
        Costs one listdir when nothing is pending.
        """
        pending = state.removals(self.paths)
        pending.pop(skip, None)
        if not pending:
            return
        from vnethook import libvirt

        for key, mark in sorted(pending.items()):
            name = mark.get("domain") or key
            try:
                dom = libvirt.running_domain(self.paths, name)
                if dom is None:
                    self._remove_locked(key, "retrying a removal that had failed")
                elif mark.get("macs") is not None:
                    present = {i.mac for i in dom.interfaces}
                    gone = [m for m in mark["macs"] if m not in present]
                    if gone:
                        self._remove_macs_locked(key, name, gone, "retrying a removal that had failed")
                    else:
                        state.clear_removal(self.paths, key)  # the NIC is back
                else:
                    continue
                log.info(f"retried the pending removal of {name}'s forwards: done", DOMAIN=name)
            except Exception as e:
                log.warning(
                    f"the pending removal of {name}'s forwards failed again ({type(e).__name__}: {e}); "
                    f"the next event, `vnethook sync` or the lease watcher retries it",
                    DOMAIN=name,
                )

    def _remove_locked(self, key: str, reason: str) -> bool:
        self._recover_if_needed()
        rec = self._read_record(key)
        if rec is None:
            if not state.exists(self.paths, key):
                state.clear_removal(self.paths, key)
                return False
            # Corrupt record: let the current backend find the rules by tag.
            self.backend().remove(key, None)
            state.delete(self.paths, key)
            state.clear_removal(self.paths, key)
            return True
        bname = rec.get("backend") or self.selected_backend()[0]
        backend = self.backend(bname)
        backend.remove(key, self._previous(backend, key, rec))
        removed = state.forwards_of(rec)
        for f in removed:
            log.info(f"removed {f.describe()} ({reason})", **log.forward_fields(f, "remove", bname))
        state.delete(self.paths, key)
        state.clear_removal(self.paths, key)
        if any(f.is_loopback for f in removed) or self._localnet_in_use():
            self._update_localnet()
        if not state.any_record(self.paths):
            self._update_others(backend)
        return True

    def _update_others(self, backend=None) -> None:
        """Our accept in other managers' FORWARD chains (firewall/others.py):
        there while any guest has a record, gone with the last one."""
        from vnethook.firewall import others

        backend = backend or self.backend()
        active = state.any_record(self.paths)
        for p in others.ensure(active, covered=getattr(backend, "forward_flavour", None)):
            log.warning(f"could not {'add' if active else 'remove'} the accept in another manager's FORWARD chain: {p}")

    def _localnet_in_use(self) -> bool:
        """Cheap check first: reading every record is O(guests)."""
        from vnethook.firewall.localnet import in_use

        return in_use(self.paths.state_dir)

    def _recover_if_needed(self) -> None:
        """Rebuild records from tagged rules when the state dir was lost.

        The records live on tmpfs; if they vanish while rules exist (someone
        removed /run/vnethook), trusting "no record = nothing installed"
        would duplicate rules. A missing guests dir triggers one listing of
        what the firewall holds; each guest found gets a pending record so
        its next change replaces the rules found by tag.
        """
        self._distrust_state_dir()
        if os.path.isdir(self.paths.guests_dir):
            return
        state.ensure_dirs(self.paths)
        try:
            backend = self.backend()
            snap = backend.snapshot()
        except Exception as e:
            log.warning(f"state directory was missing and the firewall could not be listed: {e}")
            return
        for key, rules in snap.guests.items():
            state.write(self.paths, key, key, backend.name, [], backend.layout, pending=True)
            log.warning(f"state was missing: recovered {len(rules)} tagged rule(s) of {key} from the firewall")

    def _distrust_state_dir(self) -> None:
        """Records are only used from a directory only root can change.

        A state directory (or guests/) that is a symlink, owned by someone
        else or writable by group/others is said plainly. guests/ is then set
        aside whole (renamed, kept for the admin to look at) and rebuilt from
        the tagged rules. The state directory itself is ours: a real
        directory gets its owner and mode back; a symlink or another kind of
        file stops the change, since nothing written through it is safe.
        """
        why = state.distrusted_dir(self.paths)
        if why is None:
            return
        top = self.paths.state_dir
        if why.startswith(top + ":"):
            st = os.lstat(top)
            if (st.st_mode & 0o170000) != 0o040000:
                raise StateDirError(f"refusing to use the state directory {why}; remove it and run `vnethook sync` "
                                    "(the records are rebuilt from the firewall's tagged rules)")
            fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, os.geteuid(), -1)
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
            log.error(f"state directory {why}: made it root-only (0700)")
            why = state.distrusted_dir(self.paths)
            if why is None:
                return
        aside = f"{self.paths.guests_dir}.untrusted-{int(time.time())}-{os.getpid()}"
        os.rename(self.paths.guests_dir, aside)  # a symlink is renamed, not followed
        log.error(f"state directory {why}: not trusted; set aside as {aside}, "
                  "records are rebuilt from the firewall's tagged rules")

    def _read_record(self, key: str):
        """The record of `key`; a refused one (untrusted file, bad field) is
        said once in the log and treated as lost: rules are found by tag."""
        rec = state.read(self.paths, key)
        if rec is None:
            why = state.refused(self.paths, key)
            if why:
                log.warning(f"record refused, finding {key}'s rules by tag instead: {why}")
        return rec

    @staticmethod
    def _previous(backend, key: str, rec: dict, quiet: bool = False):
        """The forwards the record says are installed, as `previous` for the
        backend, or None: find the guest's rules by tag instead.

        None when the record is pending, or was written for another layout.
        A record of an older release (rendered rules, no layout) is used only
        if its forwards still render to exactly its rules (then it is the
        current layout, and converting it is writing it without them).
        """
        if rec.get("pending"):
            return None
        forwards = state.forwards_of(rec)
        layout = rec.get("layout")
        if layout is None:
            try:
                same = sorted(backend.render(key, forwards)) == sorted(rec.get("rules") or ())
            except Exception:
                same = False
            if not same:
                if not quiet:
                    log.info(f"record of {key} (an older release's) differs from what its forwards render "
                             "to now: finding its rules by tag")
                return None
        elif layout != backend.layout:
            if not quiet:
                log.info(f"record of {key} was written for layout {layout!r}, not {backend.layout!r}: "
                         "finding its rules by tag")
            return None
        return forwards

    def recorded_rules(self, key: str, rec) -> "set | None":
        """What the record's forwards render to in its backend (the rules it
        says are installed), or None if it says nothing usable."""
        if rec is None:
            return None
        try:
            backend = self.backend(rec.get("backend") or None)
            forwards = self._previous(backend, key, dict(rec, pending=False), quiet=True)
            return None if forwards is None else set(backend.render(key, forwards))
        except Exception:
            return None

    def _converge(self, key: str, domain: str, forwards: list, waiting: list, reason: str) -> None:
        self._recover_if_needed()
        rec = self._read_record(key)
        name = self.selected_backend()[0]
        old_forwards = state.forwards_of(rec)
        if rec is not None and rec.get("backend") and rec["backend"] != name:
            # The host switched firewall backends: clear the old one first.
            old = self.backend(rec["backend"])
            old.remove(key, self._previous(old, key, rec))
            rec = None
        backend = self.backend(name)
        previous = None
        if rec is not None:
            previous = self._previous(backend, key, rec)
        elif not state.exists(self.paths, key):
            previous = []  # never installed by us: nothing to find
        if not forwards and previous == []:
            if rec is not None:
                state.delete(self.paths, key)
            if waiting:
                state.write(self.paths, key, domain, name, [], backend.layout, waiting=waiting)
            state.clear_removal(self.paths, key)
            return
        # Pending until the batch is done: if it fails (atomic: the firewall
        # holds the old set) or we are killed, the next run goes by tag.
        state.write(self.paths, key, domain, name, old_forwards, backend.layout, pending=True, waiting=waiting)
        backend.apply(key, forwards, previous)
        if forwards or waiting:
            state.write(self.paths, key, domain, name, forwards, backend.layout, waiting=waiting)
        else:
            state.delete(self.paths, key)
        self._update_others(backend)
        state.clear_removal(self.paths, key)  # the firewall holds exactly this plan now
        old, new = set(old_forwards), set(forwards)
        for f in sorted(new - old, key=lambda f: f.describe()):
            log.info(f"added {f.describe()} ({reason})", **log.forward_fields(f, "add", name))
        for f in sorted(old - new, key=lambda f: f.describe()):
            log.info(f"removed {f.describe()} ({reason})", **log.forward_fields(f, "remove", name))
        if any(f.is_loopback for f in old ^ new) or any(f.is_loopback for f in forwards):
            self._update_localnet()

    def _update_localnet(self, verify: bool = False, records: "dict | None" = None) -> None:
        """route_localnet, guarded, on exactly the bridges that have a 127.x forward.

        `verify` (sync): check the guard in the firewall and put libvirt's
        bridges that no forward needs back to 0 (see firewall/localnet.py).
        """
        from vnethook.firewall import localnet

        need = set()
        bridges = set()
        if records is None:
            records = state.all_records(self.paths)
        for rec in records.values():
            for f in state.forwards_of(rec):
                bridges.add(f.bridge)
                if f.is_loopback and f.family == 4:
                    need.add(f.bridge)
        if verify or need or localnet.in_use(self.paths.state_dir):
            from vnethook import libvirt

            bridges |= set(libvirt.running_bridges(self.paths))
        try:
            problems = localnet.ensure(self.paths.state_dir, need, bridges, verify=verify)
        except (OSError, ValueError) as e:
            problems = [f"could not set route_localnet: {e}"]
        for p in problems:
            log.warning(p)

    # -------------------------------------------------------------- sync
    def running_configured(self) -> dict:
        """Running domains that the map configures, by key."""
        from vnethook import libvirt

        out = {}
        raw: list = []
        domains = libvirt.running_domains(self.paths, metadata=raw)
        if self.config is not None and raw:
            self.use_metadata(raw)
        for dom in domains:
            if self.config and dom.name in self.config.guests:
                out[guest_key(dom.name)] = dom
        return out

    def use_metadata(self, raw: list) -> None:
        """Merge the ports the running guests declare in their own metadata
        ((xml, source) pairs from their status files) into the map."""
        from vnethook import metadata

        metas = [m for m in (metadata.read(data, source=src) for data, src in raw) if m is not None]
        self.config, self.metadata_problems = metadata.merge(self.config, metas)

    def sync(self, verify: bool = True, only_network: str | None = None) -> SyncReport:
        """Make installed forwards exactly match the plan of running guests.

        verify=True lists what the firewall really holds (after a firewalld
        reload or `nft flush ruleset` the records lie); verify=False trusts
        the records, which is what the lease waiter needs and is cheap.
        """
        report = SyncReport()
        if verify:
            self.selected_backend(redetect=True)
        backend = self.backend()
        snap = None
        with Lock(self.paths.lock_file):
            self._recover_if_needed()
            if verify:
                # Under the lock: a hook removing the last guest tears the
                # base down; a repair racing it would leave an orphan base
                # (or repair half of one).
                snap = backend.snapshot()
                if not snap.base_ok:
                    for p in snap.problems:
                        log.warning(f"firewall base: {p}", BACKEND=backend.name)
                    try:
                        backend.ensure_base()
                    except Exception as e:
                        report.errors.append(f"ensure base: {e}")
            self._retry_removals()
            # Plan under the lock: a plan made before it could be older than
            # a change a concurrent hook commits meanwhile (lost update).
            running = self.running_configured()
            if only_network is not None:
                running = {k: d for k, d in running.items() if any(i.network == only_network for i in d.interfaces)}
            for probs in self.metadata_problems.values():
                report.problems.extend(probs)
            plans = {}
            for key, dom in running.items():
                try:
                    plans[key] = (dom, self.plan_domain(dom))
                except Exception as e:  # one bad guest must not stop the others
                    report.errors.append(f"{dom.name}: {e}")
            records = state.all_records(self.paths)
            marks = state.removals(self.paths)
            for key, (dom, plan) in plans.items():
                rec = records.get(key)
                if plan is None:
                    continue
                if plan.waiting:
                    report.waiting[dom.name] = list(plan.waiting)
                report.problems.extend(plan.errors)
                want = set(plan.forwards)
                have = set(state.forwards_of(rec))
                drift = False
                if rec is not None and snap is not None and rec.get("backend") == backend.name:
                    # Installed as recorded? (A record of another layout, an
                    # upgrade's, is replaced by tag.)
                    prev = self._previous(backend, key, rec, quiet=True)
                    drift = prev is None or set(backend.render(key, prev)) != snap.guests.get(key, set())
                elif rec is None and snap is not None and snap.guests.get(key):
                    drift = True
                pending = rec is not None and rec.get("pending")
                if want == have and not drift and not pending and rec is not None and (rec.get("backend") == backend.name):
                    if list(rec.get("waiting") or ()) != list(plan.waiting) or rec.get("layout") != backend.layout:
                        # (also converts an older release's record: its rules matched)
                        state.write(self.paths, key, dom.name, backend.name, list(plan.forwards), backend.layout, waiting=list(plan.waiting))
                    if key in marks:
                        state.clear_removal(self.paths, key)  # the firewall matches the plan
                    report.unchanged += 1
                    continue
                if want == have == set() and rec is None and not drift:
                    if plan.waiting:
                        state.write(self.paths, key, dom.name, backend.name, [], backend.layout, waiting=list(plan.waiting))
                    continue
                if drift and rec is not None:
                    rec["pending"] = True  # distrust the record: find rules by tag
                    state.write(self.paths, key, dom.name, rec.get("backend") or backend.name, list(have), rec.get("layout") or "", pending=True, waiting=list(plan.waiting))
                try:
                    self._converge(key, dom.name, list(plan.forwards), list(plan.waiting), "sync")
                    report.applied.append(dom.name)
                except Exception as e:
                    report.errors.append(f"{dom.name}: {e}")
            if only_network is None:
                gone = set(records) | (set(snap.guests) if snap else set())
                gone -= set(plans)
                for key in sorted(gone):
                    rec = records.get(key)
                    name = (rec or {}).get("domain") or key
                    try:
                        if rec is None and key not in records:
                            backend.remove(key, None)
                        else:
                            self._remove_locked(key, "sync: guest not running or not in the map")
                        report.removed.append(name)
                    except Exception as e:
                        state.mark_removal(self.paths, key, name)
                        conflicts = self.lease_conflicts(state.forwards_of(rec))
                        report.errors.append(f"{name}: removal failed, retried later: {e}" + "".join(f"; {c}" for c in conflicts))
                if verify and not report.errors and not state.any_record(self.paths):
                    self._drop_orphan_base(backend, report)
            if verify:
                # The records read above, unless this sync changed some.
                same = not (report.applied or report.removed or report.errors)
                self._update_localnet(verify=True, records=records if same else None)
            self._update_others(backend)
        return report

    def _path_problems(self, v6_flags: set) -> list:
        """What would drop every forwarded connection, past our own rules:
        ip forwarding off, another manager's filter on the forward hook."""
        out = []
        for fam, path in ((4, "/proc/sys/net/ipv4/ip_forward"), (6, "/proc/sys/net/ipv6/conf/all/forwarding")):
            if fam == 6 and True not in v6_flags:
                continue
            try:
                with open(path) as f:
                    if f.read().strip() == "0":
                        out.append(f"dropped: {path} is 0 (IPv{fam} forwarding off; libvirt turns it on with a NAT network)")
            except OSError:
                pass
        return out + self.manager_problems()

    def manager_problems(self) -> list:
        """Other managers' filters on the forward hook that drop our DNATed
        connections: iptables FORWARD chains of either flavour and native
        nftables base chains (firewall/others.py)."""
        from vnethook.firewall import others

        out = []
        mine = getattr(self.backend(), "forward_flavour", None)
        try:
            views = others.views()
        except Exception as e:
            return [f"cannot list other managers' FORWARD chains: {e}"]
        for (flavour, fam), view in sorted(views.items()):
            v = others.verdict(view, flavour, fam, jump_first=flavour == mine)
            if v:
                out.append(v)
        try:
            out += others.nft_culprits(others.nft_ruleset())
        except Exception as e:
            out.append(f"cannot list the nftables ruleset: {e}")
        return out

    def needs_repair(self):
        """Why the firewall no longer holds what the records say (base or
        a guest's rules gone: a flushed ruleset), or None. One listing."""
        records = state.all_records(self.paths)
        if not records:
            return None
        backend = self.backend()
        snap = backend.snapshot()
        if not snap.base_ok:
            return f"firewall base: {snap.problems[0]}"
        for key, rec in records.items():
            if rec and rec.get("backend") == backend.name and not rec.get("pending"):
                if (self.recorded_rules(key, rec) or set()) - snap.guests.get(key, set()):
                    return f"{rec.get('domain') or key}: recorded rules are missing from the firewall"
        return None

    def _drop_orphan_base(self, backend, report) -> None:
        """No guest has forwards: nothing of ours may stay, not even the base.

        A backend drops its chains and jumps after removing the last guest,
        in a step of its own; killed between the two, it leaves a base that
        no later removal ever sees (no guest rules left to find by tag).
        """
        try:
            if not backend.snapshot().guests:
                backend.flush()
        except Exception as e:
            report.errors.append(f"dropping the unused base: {e}")

    def remove_network(self, network: str) -> list:
        """Remove the forwards of every guest whose forwards use `network`."""
        done = []
        with Lock(self.paths.lock_file):
            self._retry_removals()
            for key, rec in state.all_records(self.paths).items():
                if rec and any(f.network == network for f in state.forwards_of(rec)):
                    name = rec.get("domain") or key
                    state.mark_removal(self.paths, key, name)
                    self._remove_locked(key, f"network {network} stopped")
                    done.append(name)
        return done

    def ensure_base(self) -> None:
        """Put vnethook's base rules back (network started), under the lock."""
        with Lock(self.paths.lock_file):
            self.backend().ensure_base()

    def lease_conflicts(self, forwards) -> list:
        """Forwards whose address dnsmasq now leases to another MAC.

        Such a DNAT would deliver the guest's ports to whichever guest holds
        the address now. Returns one message per address.
        """
        from vnethook import libvirt

        out = []
        seen = set()
        leases = {}
        now = time.time()
        for f in forwards:
            if (f.bridge, f.guest_address) in seen or not f.bridge:
                continue
            seen.add((f.bridge, f.guest_address))
            if f.bridge not in leases:
                try:
                    leases[f.bridge] = libvirt.read_leases(self.paths.lease_file(f.bridge), now=now)
                except libvirt.LibvirtDataError:
                    leases[f.bridge] = []
            from vnethook.plan import leased_to_others

            others = leased_to_others(leases[f.bridge], f.guest_address, f.mac, now)
            if others:
                out.append(
                    f"{f.domain}: forwards to {f.guest_address} (NIC {f.mac}), but dnsmasq leases "
                    f"{f.guest_address} to {', '.join(others)} now"
                )
        return out

    def flush(self) -> list:
        """Remove everything vnethook owns, from every backend it may have used."""
        names = set()
        for rec in state.all_records(self.paths).values():
            if rec and rec.get("backend"):
                names.add(rec["backend"])
        try:
            names.add(self.selected_backend()[0])
        except Exception:
            pass
        done = []
        with Lock(self.paths.lock_file):
            for n in sorted(names):
                self.backend(n).flush()
                done.append(n)
            for key in list(state.all_records(self.paths)):
                state.delete(self.paths, key)
            for key in state.removals(self.paths):
                state.clear_removal(self.paths, key)
            self._update_localnet()
            self._update_others()
        return done

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        name, reason = self.selected_backend(redetect=True)
        out: dict = {"backend": {"name": name, "reason": reason}, "guests": [], "problems": [], "warnings": []}
        try:
            snap = self.backend().snapshot()
        except Exception as e:
            snap = None
            out["problems"].append(f"cannot list the firewall: {e}")
        if snap is not None:
            out["problems"].extend(snap.problems)
        records = state.all_records(self.paths)
        marks = state.removals(self.paths)
        running = {}
        try:
            running = self.running_configured()
        except Exception as e:
            out["problems"].append(f"cannot read running domains: {e}")
        for probs in self.metadata_problems.values():
            out["problems"].extend(f"{p} (not forwarded)" for p in probs)
        keys = sorted(set(records) | set(running) | set(marks) | (set(snap.guests) if snap else set()))
        for key in keys:
            rec = records.get(key)
            dom = running.get(key)
            name = dom.name if dom else ((rec or {}).get("domain") or (marks.get(key) or {}).get("domain") or key)
            plan = None
            if dom is not None:
                try:
                    plan = self.plan_domain(dom)
                except Exception as e:
                    out["problems"].append(f"{name}: {e}")
            desired = sorted(f.describe() for f in (plan.forwards if plan else ()))
            installed = sorted(f.describe() for f in state.forwards_of(rec))
            have_rules = snap.guests.get(key, set()) if snap else set()
            rec_rules = self.recorded_rules(key, rec) or set()
            drift = []
            if snap is not None and rec_rules != have_rules:
                missing = len(rec_rules - have_rules)
                extra = len(have_rules - rec_rules)
                drift.append(f"{missing} recorded rule(s) missing, {extra} unrecorded rule(s) present in the firewall")
            if set(desired) != set(installed):
                drift.append("installed forwards differ from the map (run `vnethook sync`)")
            if key in marks:
                drift.append("a removal of these forwards failed and is pending (retried by the next event, `vnethook sync` or the lease watcher)")
            drift.extend(self.lease_conflicts(state.forwards_of(rec)))
            out["guests"].append(
                {
                    "domain": name,
                    "key": key,
                    "running": dom is not None,
                    "addresses": [list(a) for a in (plan.addresses if plan else ())],
                    "desired": desired,
                    "installed": installed,
                    "waiting": list(plan.waiting) if plan else list((rec or {}).get("waiting") or ()),
                    "errors": list(plan.errors) if plan else [],
                    "drift": drift,
                    "backend": (rec or {}).get("backend"),
                }
            )
        out["path_problems"] = list(snap.problems) if snap is not None else ["cannot list the firewall"]
        if any(g["installed"] for g in out["guests"]):
            more = self._path_problems({f.startswith("[") for g in out["guests"] for f in g["installed"]})
            out["path_problems"] += more
            out["problems"].extend(more)
        if self.config is not None:
            from vnethook.listeners import host_listeners, taken

            out["warnings"] = taken([r for g in self.config.guests.values() for r in g.forwards], host_listeners())
        return out


def _detect_cached(paths, redetect: bool) -> tuple:
    """Detect libvirt's firewall backend once, then reuse it from /run.

    Detection may list nft tables; caching keeps hooks fast. The cache is
    dropped when network.conf changes and refreshed at every network start
    and sync, which is exactly when libvirt may have created its tables.
    """
    cache = os.path.join(paths.state_dir, "backend.json")
    try:
        st = os.stat(paths.network_conf)
        stamp = [st.st_mtime_ns, st.st_size]
    except OSError:
        stamp = None
    from vnethook import jsonlite as json

    if not redetect:
        try:
            with open(cache, "rb") as f:
                data = json.loads(f.read())
            if data.get("stamp") == stamp and data.get("name"):
                return data["name"], data["reason"]
        except (OSError, ValueError):
            pass
    from vnethook.firewall import detect

    name, reason = detect(paths)
    try:
        os.makedirs(paths.state_dir, mode=0o700, exist_ok=True)
        atomic_write(cache, json.dumps({"name": name, "reason": reason, "stamp": stamp}).encode())
    except OSError:
        pass
    return name, reason
