"""A stateful model of retention and tiering (hypothesis): stores, an injected clock moving on,
`policy apply`, holds, recalls, a tape cartridge taken out and put back, crashes in the middle of a
migration and restarts. Whatever the sequence:

- nothing acknowledged is lost: every study that has not expired reads back byte-exact
  (or, when its only copies are on the cartridge that is out, is still indexed with them);
- nothing under hold or within retention is ever deleted;
- every expired study is unreadable on every tier: its key is destroyed and no copy of it is
  left anywhere, except copies the deletion record lists as not reachable yet.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from conftest import add_tier, load_cartridge, make_study
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from appliance import config as cfg
from appliance.admin import home as home_mod
from appliance.admin.home import open_archive
from appliance.errors import CartridgeOffline
from appliance.jobs import lifecycle
from appliance.jobs.policy import add_years, check_policies

DAY = 86400
TODAY = date.today()
_SOURCE = Path(tempfile.mkdtemp(prefix="pv-lifecycle-model-"))
atexit.register(shutil.rmtree, _SOURCE, True)


def _d(day: date) -> str:
    return day.strftime("%Y%m%d")


# (patient id, birth date, study date): two adults, a child, an adult's older study.
PEOPLE = [("ADULT1", date(1960, 5, 5), TODAY), ("ADULT2", date(1971, 1, 2), TODAY),
          ("CHILD", TODAY - timedelta(days=365 * 8), TODAY), ("ADULT1", date(1960, 5, 5), TODAY - timedelta(days=400))]
STUDIES = [make_study(_SOURCE / f"s{n}", 2, patient_id=pid, birth_date=_d(birth), study_date=_d(day), pixels=32)
           for n, (pid, birth, day) in enumerate(PEOPLE)]
POLICY = """classes:
  - name: children
    match: {patient_age_at_study: {below: 18}}
    retention: {until_patient_age: 25, years_after_last_study: 2}
    transitions: [{after_days_without_access: 30, to: [cold, tape]}]
    at_expiry: delete
  - name: adults
    match: {}
    retention: {years_after_study: 3}
    transitions: [{after_days_without_access: 30, to: [tape]}]
    at_expiry: delete
"""


class Crash(BaseException):
    """The process dies here: nothing after this point runs, nothing is cleaned up."""


class CrashingTier:
    """Wraps a tier so that the next put dies halfway through (a real partial file is left)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def put(self, name, src):
        class Half:
            def __init__(self, fp):
                self.fp, self.sent = fp, 0

            def tell(self):
                return self.fp.tell()

            def seek(self, *args):
                return self.fp.seek(*args)

            def read(self, n=-1):
                if self.sent > 0:
                    raise Crash()
                data = self.fp.read(min(n if n > 0 else 1 << 20, 4096))
                self.sent += len(data)
                return data
        self.inner.put(name, Half(src))

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


class LifecycleModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="pv-lifecycle-home-"))
        self.home = self.dir / "home"
        home_mod.init(self.home)
        (self.home / "policies" / "default.yaml").write_text(POLICY)
        self.cartridge = self.home / "cartridges" / "PV0001L9"
        self.shelf = self.home / "shelf"
        load_cartridge(self.cartridge, "PV0001L9")
        add_tier(self.home, "tape", "kind: ltfs\ncartridges:\n  - {label: PV0001L9, path: cartridges/PV0001L9, "
                                    "capacity_mb: 1000}\nretries: 0\n")
        text = (self.home / "appliance.yaml").read_text().replace("recall_wait_s: 300", "recall_wait_s: 0")
        (self.home / "appliance.yaml").write_text(text.replace("retry_backoff_s: 60", "retry_backoff_s: 1"))
        self.config = cfg.load(self.home)
        self.rules = check_policies(self.config)
        self.clock = time.time()
        self._open()
        self.stored: dict[int, bytes] = {}  # study number -> key id it is sealed under
        self.deleted: dict[int, bytes] = {}  # study number -> destroyed key id
        self.held: set[int] = set()
        self.last_store: dict[int, float] = {}

    def _open(self):
        self.archive = open_archive(self.config, writer=True)
        self.engine = lifecycle.Lifecycle(self.archive, self.rules, clock=lambda: self.clock)

    def teardown(self):
        self.archive.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _uid(self, number: int) -> str:
        return STUDIES[number][0]

    # -- what may happen ----------------------------------------------------------------------

    @initialize(numbers=st.sets(st.integers(0, len(STUDIES) - 1), min_size=1))
    def first_studies(self, numbers):
        for number in sorted(numbers):
            self.store(number)

    @rule(number=st.integers(0, len(STUDIES) - 1))
    def store(self, number):
        for path in STUDIES[number][1]:
            self.archive.store_file(path)
        self.stored[number] = self.archive.study_key(self._uid(number))
        self.deleted.pop(number, None)
        self.last_store[number] = self.clock

    @rule(days=st.sampled_from([1, 31, 400, 1200, 6000]))
    def advance_clock(self, days):
        self.clock += days * DAY

    @rule()
    def apply(self):
        before = set(self._indexed())
        self.engine.apply()
        self._check_deletions(before)

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def crash_during_apply(self, data):
        tier = data.draw(st.sampled_from(["cold", "tape"]))
        self.clock += 31 * DAY  # so that migrations are due
        before = set(self._indexed())
        self.archive._tiers[tier] = CrashingTier(self.archive.tier(tier))
        try:
            self.engine.apply()
            event("apply with a crashing tier ran without writing to it")
        except Crash:
            event("crashed mid-pack")
        # The process is gone: its archive is abandoned without any cleanup, a new one starts
        # (its stores' journal was applied before the crash; only its threads are stopped).
        if self.archive._journal is not None:
            self.archive._journal.close()
        self.archive._index.close()
        self.archive.keyring.close()
        self.archive._lock.__exit__(None, None, None)
        self._open()
        self._check_deletions(before)

    @precondition(lambda self: self.stored)
    @rule(data=st.data(), hold=st.booleans())
    def hold_or_release(self, data, hold):
        number = data.draw(st.sampled_from(sorted(self.stored)))
        key = f"study:{self._uid(number)}"
        if hold:
            lifecycle.set_hold(self.archive, key, "model")
            self.held.add(number)
        elif number in self.held:
            lifecycle.release_hold(self.archive, key, "model")
            self.held.discard(number)

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def recall(self, data):
        number = data.draw(st.sampled_from(sorted(self.stored)))
        try:
            self.archive.recall_study(self._uid(number))
        except CartridgeOffline:
            assert not self.cartridge.exists()

    @rule()
    def take_out_or_put_back_the_cartridge(self):
        if self.cartridge.exists():
            self.cartridge.rename(self.shelf)
        else:
            self.shelf.rename(self.cartridge)

    # -- what must hold -----------------------------------------------------------------------

    def _indexed(self) -> list[str]:
        return self.archive.study_uids()

    def _retention_end(self, number: int) -> date:
        pid, birth, study_day = PEOPLE[number]
        if pid == "CHILD":
            return max(add_years(birth, 25), add_years(study_day, 2))
        return add_years(study_day, 3)

    def _check_deletions(self, before: set[str]) -> None:
        today = date.fromtimestamp(self.clock)
        for number in list(self.stored):
            uid = self._uid(number)
            if uid in before and uid not in self._indexed():
                assert number not in self.held, "a held study was deleted"
                assert today >= self._retention_end(number), "a study within retention was deleted"
                self.deleted[number] = self.stored.pop(number)
                event("a study expired and was deleted")
                self.held.discard(number)

    @invariant()
    def nothing_acknowledged_is_lost(self):
        assert set(self._indexed()) >= {self._uid(n) for n in self.stored}
        for number in self.stored:
            uid = self._uid(number)
            try:
                got = {}
                for record in self.archive.instances_of_study(uid):
                    got[record.sop_uid] = b"".join(self.archive.open_blob(record.current))
            except CartridgeOffline:
                assert not self.cartridge.exists()
                continue
            assert sorted(got.values()) == sorted(p.read_bytes() for p in STUDIES[number][1])

    @invariant()
    def every_expired_study_is_unreadable_everywhere(self):
        with self.archive.catalog.read() as view:
            packs = {pack.id for pack in view.packs()}
            pending = {u["pack"] for rec in view.deletions().values() for u in rec["unremoved"]}
            jobs = {p for job in view.jobs() for p in job.pending.values()}
            hot_names = {copy.name for blob in view.blobs() if (copy := blob.hot(self.archive.hot.name))}
        for number, key_id in self.deleted.items():
            assert not self.archive.keyring.has(key_id)
        # Every object on every tier is an indexed copy, a copy of a deleted study still to be
        # removed, or the remains of a crashed write its job will clean up.
        on_cold = set(self.archive.tier("cold").list())
        on_tape = set(self.archive.tier("tape").list()) if self.cartridge.exists() else set()
        assert on_cold | on_tape <= packs | pending | jobs
        assert set(self.archive.hot.list()) == hot_names


LifecycleModel.TestCase.settings = settings(max_examples=30, stateful_step_count=16, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestLifecycleModel = LifecycleModel.TestCase
