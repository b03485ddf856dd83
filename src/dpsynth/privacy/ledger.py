"""The privacy ledger (``RUN/ledger.json``): every use of private data in a run's lineage.

Each DP mechanism (DP-SGD stage, Gaussian-mechanism statistic, DP attribute model) is an
entry ``(noise_multiplier, sample_rate, steps)`` plus provenance; the lineage's total ε is
the composition of all of them by one accountant. Uses without a DP guarantee (e.g. a
private validation loss) are entries flagged ``non_private``: never composed, always shown.

A run starts from its parents' ledgers (:meth:`Ledger.inherit`), so the total covers the
autoencoder, the initialisation and the attribute model that the run builds on. Writers
never overwrite: :meth:`Ledger.save` merges with the ledger already in the run (by entry
id, the larger step count wins, conflicting copies are refused), so a DP stage, its
resume and `fit-attributes` writing into one run all keep each other's entries.

Entries name their data by the cache's random ``cache_id``, never by a digest of it: a
deterministic function of the private data would tell neighbouring datasets apart.

Step semantics (resume-safe): an entry's ``steps`` is the number of steps contained in the
latest saved model state, i.e. the DP-SGD checkpoint's step count. The training loop
checks the budget with the *planned* steps before the stage starts
(:meth:`Ledger.check_budget`), then after each checkpoint write sets ``steps`` to the
checkpoint's count (:meth:`Ledger.update_steps`) and saves the ledger. On resume it sets
``steps`` to the checkpoint's count again: a value, not an increment, so nothing is
counted twice, and since the checkpoint is written first the ledger never runs behind a
state that could be released. Steps computed after the last checkpoint are discarded with
their state. ``steps`` never decreases (resuming from an older checkpoint would hide
spending that an earlier state may already have released) and never exceeds
``planned_steps`` (the spending that passed the budget check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import operator
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dpsynth.config import DEFAULT_DELTA
from dpsynth.errors import BudgetExceededError, DpsynthError
from dpsynth.io import atomic_write_json, read_json
from dpsynth.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    Mechanism,
    check_delta,
    check_epsilon,
    check_mechanism,
    epsilon_for,
    format_bound,
)

LEDGER_FILE = "ledger.json"
FORMAT_VERSION = 2
# Format 1 named the data by a SHA-256 digest of the private cache (a non-DP release);
# such ledgers still load, with the digest dropped, and are rewritten as format 2.
OLD_FORMATS = (1,)
DP_MECHANISMS = ("dp-sgd", "gaussian")
# Non-private uses whose outputs never reach the weights (their results stay in the run
# folder and are not released). Any other non-private use is presumed to have shaped the
# model: the lineage is then NOT DP (`Ledger.shaping_uses`).
EVALUATION_USES = ("ldm-validation",)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism (or non-private use) applied to a private dataset.

    `cache_id` names the data by the random id in its cache's meta.json ("" if unknown).
    `records` is the dataset size in patients. For DP entries `sample_rate` is the Poisson
    rate per step (1.0 for a one-shot statistic) and `noise_multiplier` the ratio of noise
    std to L2 sensitivity.
    """

    stage: str
    mechanism: str
    cache_id: str
    records: int
    delta: float = DEFAULT_DELTA
    accountant: str = DEFAULT_ACCOUNTANT
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    planned_steps: int = 0
    steps: int = 0
    non_private: bool = False
    note: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        key = f"ledger entry {self.stage!r}"
        if not self.stage or not isinstance(self.stage, str):
            raise DpsynthError("ledger entry: stage must be a non-empty string")
        for name in ("records", "steps", "planned_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise DpsynthError(f"{key}: {name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))  # plain int for JSON (numpy in, int out)
        if not isinstance(self.non_private, bool):  # a truthy string would hide spending
            raise DpsynthError(f"{key}: non_private must be true or false")
        if self.non_private:
            return
        if self.mechanism not in DP_MECHANISMS:
            raise DpsynthError(
                f"{key}: mechanism {self.mechanism!r} is not one of {', '.join(DP_MECHANISMS)} "
                "(flag non-DP uses with non_private=True)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise DpsynthError(f"{key}: unknown accountant {self.accountant!r}")
        object.__setattr__(self, "delta", check_delta(self.delta, key=f"{key}: delta"))
        sigma, q, _ = check_mechanism((self.noise_multiplier, self.sample_rate, 1), key=key)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)
        if self.steps > self.planned_steps:
            raise DpsynthError(
                f"{key}: {self.steps} steps exceed the {self.planned_steps} planned (budget-checked)"
            )

    @classmethod
    def gaussian(
        cls,
        stage: str,
        noise_multiplier: float,
        records: int,
        delta: float = DEFAULT_DELTA,
        accountant: str = DEFAULT_ACCOUNTANT,
        cache_id: str = "",
        note: str = "",
    ) -> LedgerEntry:
        """A one-shot Gaussian-mechanism release on the whole dataset (q = 1, one step)."""
        return cls(
            stage=stage,
            mechanism="gaussian",
            cache_id=cache_id,
            records=records,
            delta=delta,
            accountant=accountant,
            noise_multiplier=noise_multiplier,
            sample_rate=1.0,
            planned_steps=1,
            steps=1,
            note=note,
        )

    @classmethod
    def non_private_use(
        cls, stage: str, records: int, note: str, cache_id: str = ""
    ) -> LedgerEntry:
        """A use of private data whose outputs are never released (e.g. validation loss)."""
        return cls(
            stage=stage,
            mechanism="non-private",
            cache_id=cache_id,
            records=records,
            non_private=True,
            note=note,
        )

    def mechanism_spent(self, planned: bool = False) -> Mechanism | None:
        """The entry as an accountant history item; None if it spends nothing."""
        steps = self.planned_steps if planned else self.steps
        if self.non_private or steps == 0:
            return None
        return Mechanism(self.noise_multiplier, self.sample_rate, steps)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict, source: str = "ledger") -> LedgerEntry:
        if not isinstance(obj, dict):
            raise DpsynthError(f"{source}: each entry must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        missing = sorted(names - set(obj))  # no defaults on load: a lost field is corruption
        if unknown or missing:
            raise DpsynthError(
                f"{source}: entry {obj.get('id', '?')}: unknown keys {unknown}, missing {missing}"
            )
        return cls(**obj)


class Ledger:
    """Ordered, id-unique collection of :class:`LedgerEntry`, saved as ``ledger.json``."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries: dict[str, LedgerEntry] = {}
        for entry in entries:
            self.add(entry)

    @property
    def entries(self) -> list[LedgerEntry]:
        return list(self._entries.values())

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._entries

    def __getitem__(self, entry_id: str) -> LedgerEntry:
        try:
            return self._entries[entry_id]
        except KeyError:
            raise DpsynthError(f"ledger: no entry with id {entry_id!r}") from None

    @classmethod
    def inherit(cls, *parents: Ledger) -> Ledger:
        """A new ledger holding the union of the parents' entries (shared ancestors once).

        The one merge rule of the ledger: parents of a run, and what a run holds on disk
        against what a writer holds in memory (:meth:`save`, :meth:`of_run`).

        Two copies of one entry may differ only in `steps` (one parent saw a later state
        of the same stage); the larger count is kept so spending is never under-reported.
        """
        merged: dict[str, LedgerEntry] = {}
        for parent in parents:
            for entry in parent:
                seen = merged.get(entry.id)
                if seen is None:
                    merged[entry.id] = entry
                    continue
                if dataclasses.replace(seen, steps=entry.steps) != entry:
                    raise DpsynthError(
                        f"ledger: entry {entry.id} ({entry.stage!r}) differs between two "
                        "copies (parent runs, or a run and its writer) beyond its step "
                        "count; refusing to merge an inconsistent lineage"
                    )
                if entry.steps > seen.steps:
                    merged[entry.id] = entry
        return cls(list(merged.values()))

    @classmethod
    def of_lineage(cls, runs: Iterable[str | Path]) -> Ledger:
        """The inherited ledger of a model built from `runs` (runs without one add nothing)."""
        return cls.inherit(*(cls.load(run, missing_ok=True) for run in runs))

    @classmethod
    def of_run(cls, run: str | Path, parents: Iterable[str | Path] = ()) -> Ledger:
        """What a writer into `run` builds on: the run's own entries (e.g. an attribute model
        fitted earlier) merged with its parents' lineage. Budget checks start from this."""
        return cls.of_lineage([run, *parents])

    def add(self, entry: LedgerEntry) -> LedgerEntry:
        if entry.id in self._entries:
            raise DpsynthError(f"ledger: entry {entry.id} ({entry.stage!r}) is already recorded")
        self._entries[entry.id] = entry
        return entry

    def update_steps(self, entry_id: str, steps: int) -> LedgerEntry:
        """SET the completed steps of a DP-SGD entry to the checkpoint's count (see module doc)."""
        entry = self[entry_id]
        try:
            steps = operator.index(steps)  # accepts numpy integers from a checkpoint
        except TypeError:
            raise DpsynthError(f"ledger: steps must be an integer, got {steps!r}") from None
        if entry.non_private:
            raise DpsynthError(f"ledger: entry {entry_id} ({entry.stage!r}) is not a DP mechanism")
        if steps < entry.steps:
            raise DpsynthError(
                f"ledger: stage {entry.stage!r} already records {entry.steps} steps; refusing to "
                f"set {steps} (resume from the latest checkpoint, not an older one)"
            )
        updated = dataclasses.replace(entry, steps=steps)  # validates steps <= planned
        self._entries[entry_id] = updated
        return updated

    def history(self, planned: LedgerEntry | None = None) -> list[Mechanism]:
        """Accountant history of every DP entry at its completed steps.

        With a `planned` entry (the budget view): it joins at its planned steps, replacing
        any entry with its id, and so does every DP entry that has completed steps, since
        an interrupted stage spends the rest of its plan when it resumes. An entry with no
        completed steps has no checkpoint to resume from: it never spends.
        """
        entries = dict(self._entries)
        if planned is not None:
            entries[planned.id] = planned
        spent = [
            e.mechanism_spent(planned=planned is not None and (e.id == planned.id or e.steps > 0))
            for e in entries.values()
        ]
        return [m for m in spent if m is not None]

    @property
    def cache_ids(self) -> set[str]:
        """The ids of the caches (private data) this ledger's entries name."""
        return {e.cache_id for e in self if e.cache_id}

    def not_dp(self, trained_on: Iterable[dict]) -> list[str]:
        """Cache ids a model's ``trained_on`` (as `runs.read_lineage` reads it) says it
        learned WITHOUT DP that this ledger names as private: ε then does not cover those
        weights at all."""
        private = self.cache_ids
        return [
            item["cache_id"]
            for item in trained_on
            if not item["dp"] and item["cache_id"] in private
        ]

    def shaping_uses(self) -> list[LedgerEntry]:
        """Non-private uses that may have shaped the weights (not in `EVALUATION_USES`): the
        sweep's ε = ∞ training, say. ε does not cover them at all."""
        return [e for e in self if e.non_private and e.stage not in EVALUATION_USES]

    def require_accounted(self, trained_on: Iterable[dict], where: str | os.PathLike) -> None:
        """Refuse a model (`where`) whose ``trained_on`` says it learned a cache WITH DP that
        no DP-SGD entry of this ledger names, or names a DP-SGD ``ledger_entry`` this ledger
        does not hold: the ledger (a parent's ``ledger.json`` lost, or a copy of a run
        without it, or an ancestor's ledger on the same cache copied over the run's) would
        under-state what the weights spent. Only a training entry counts: an attribute
        model fitted later names the cache too. A lineage that also learned private data
        without DP (`not_dp`) passes: its ε is ∞, which nothing can under-state."""
        if self.not_dp(trained_on):
            return
        sgd = [e for e in self if e.mechanism == "dp-sgd"]
        trained, entries = {e.cache_id for e in sgd}, {e.id: e for e in sgd}
        for item in trained_on:
            if not item["dp"]:
                continue
            if item["cache_id"] not in trained:
                raise DpsynthError(
                    f"{where}: its weights learned cache {item['cache_id']} with DP (model.json "
                    "trained_on, its own or a parent's), but its ledger.json records no DP-SGD "
                    "on it (lost, or not copied with the run): no ε can be stated; restore "
                    "that ledger.json or retrain"
                )
            named = item.get("ledger_entry", "")  # absent in runs of an older dpsynth
            if named and named not in entries:
                raise DpsynthError(
                    f"{where}: its weights learned cache {item['cache_id']} with DP in ledger "
                    f"entry {named} (model.json trained_on, its own or a "
                    "parent's), which its ledger.json does not hold (lost, or replaced by "
                    "another run's): no ε can be stated; restore that ledger.json or retrain"
                )
            # model.json is written when a stage ends, so each entry it names is complete.
            if named and entries[named].steps < entries[named].planned_steps:
                e = entries[named]
                raise DpsynthError(
                    f"{where}: its ledger.json records {e.steps} of the {e.planned_steps} steps "
                    f"of stage {e.stage!r} (entry {named}, on cache {e.cache_id}), which "
                    "finished: a copy taken mid-training; restore the ledger.json written "
                    "when that stage ended, or retrain"
                )

    def default_delta(self) -> float:
        """The largest δ any DP entry was planned with (the default δ for totals)."""
        deltas = [e.delta for e in self if not e.non_private]
        return max(deltas, default=DEFAULT_DELTA)

    def total_epsilon(
        self, delta: float | None = None, accountant: str = DEFAULT_ACCOUNTANT
    ) -> float:
        """ε at `delta` of all DP entries of the lineage, composed by one accountant."""
        delta = self.default_delta() if delta is None else delta
        return epsilon_for(self.history(), delta, accountant)

    def composed_epsilon(self, delta: float | None = None) -> tuple[float, float, str]:
        """(ε, δ, accountant) of this lineage: what `dpsynth budget`, the report and the
        release state through `report.stated_privacy` (which also checks the lineage, and
        passes the smallest run's δ for several runs).

        δ is the largest any DP entry was planned with. Each DP stage names the accountant
        its noise was calibrated with; the lineage is composed by each of them and the
        largest bound is stated, so ε is never under-reported when stages differ.
        """
        delta = self.default_delta() if delta is None else delta
        epsilon, accountant = self._largest_bound(self.history(), delta)
        return epsilon, delta, accountant

    def _largest_bound(
        self, history: list, delta: float, planned: LedgerEntry | None = None
    ) -> tuple[float, str]:
        """(ε, accountant): `history` composed by each accountant a DP stage names, the
        largest bound; the one rule behind every stated ε and every budget check."""
        stages = [e for e in (*self, planned) if e is not None and not e.non_private]
        names = sorted({e.accountant for e in stages}) or [DEFAULT_ACCOUNTANT]
        return max((epsilon_for(history, delta, name), name) for name in names)

    def check_budget(
        self,
        planned: LedgerEntry,
        max_total_epsilon: float,
        delta: float | None = None,
    ) -> float:
        """Total ε if `planned` runs all its planned steps; raise if above the limit.

        Call before the stage touches private data. Returns the projected total, by the
        rule `composed_epsilon` states afterwards (so a stage within budget here is
        within it in `dpsynth budget` too).
        """
        max_total_epsilon = check_epsilon(max_total_epsilon, key="max_total_epsilon")
        if delta is None:
            delta = max(self.default_delta(), planned.delta)
        total, _ = self._largest_bound(self.history(planned), delta, planned)
        if total > max_total_epsilon:
            raise BudgetExceededError(
                f"stage {planned.stage} would bring total ε to {format_bound(total)} at δ={delta:g}, "
                f"above --max-total-epsilon {max_total_epsilon:g}"
            )
        return total

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "entries": [e.to_json() for e in self]}

    @classmethod
    def from_json(cls, obj: dict, source: str = "ledger") -> Ledger:
        if not isinstance(obj, dict) or not isinstance(obj.get("entries"), list):
            raise DpsynthError(f"{source}: expected an object with an 'entries' list")
        version = obj.get("format_version")
        if version != FORMAT_VERSION and version not in OLD_FORMATS:
            raise DpsynthError(f"{source}: unsupported format_version {version!r}")
        entries = obj["entries"] if version == FORMAT_VERSION else map(_upgrade, obj["entries"])
        return cls([LedgerEntry.from_json(e, source) for e in entries])

    def save(self, path: str | Path) -> Path:
        """Merge with the ledger already at `path` (a ``.json`` file, or a run directory)
        and write the union atomically; this ledger then holds the union.

        Every writer of a run's ledger goes through here, so no entry a run records is ever
        dropped. The run folder is locked meanwhile, so two writers cannot interleave.
        """
        path = ledger_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            merged = Ledger.inherit(Ledger.load(path, missing_ok=True), self)
            self._entries = merged._entries
            atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path, missing_ok: bool = False) -> Ledger:
        """Read `path` (a ``.json`` file or a run directory); an absent ledger is empty
        when `missing_ok` (a run that never touched private data)."""
        path = ledger_path(path)
        if missing_ok and not path.exists():
            return cls()
        return cls.from_json(read_json(path), source=str(path))


def _upgrade(entry: object) -> object:
    """A format-1 entry without its digest of the private data (the id is unknown)."""
    if isinstance(entry, dict) and "fingerprint" in entry:
        entry = {k: v for k, v in entry.items() if k != "fingerprint"} | {"cache_id": ""}
    return entry


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on `folder` (POSIX; elsewhere no lock)."""
    try:
        import fcntl  # optional: POSIX only
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def ledger_path(path: str | Path) -> Path:
    """The ledger a path names: a ``.json`` file itself, else the run folder's ledger.json."""
    path = Path(path)
    return path if path.suffix == ".json" else path / LEDGER_FILE


def has_ledger(run: str | Path) -> bool:
    """Whether run folder `run` holds a ledger.json. Training records it in model.json
    (``ledger``) when it ends, so a ledger found missing later reads as lost, not as a
    public run's (`privacy.lineage.may_lack_ledger`)."""
    return (Path(run) / LEDGER_FILE).is_file()


def format_ledger(ledger: Ledger, not_dp: Sequence[str] = (), delta: float | None = None) -> str:
    """Human-readable ledger for ``dpsynth budget RUN``: the composed ε of `composed_epsilon`
    (at `delta`, by default its own), or none at all where the model learned a private
    cache without DP (`Ledger.not_dp`) or a non-private use may have shaped it
    (`Ledger.shaping_uses`)."""
    total, delta, accountant = ledger.composed_epsilon(delta)
    dp = [e for e in ledger if not e.non_private]
    other = [e for e in ledger if e.non_private]
    lines = [f"Privacy ledger: {len(dp)} DP mechanism(s), {len(other)} non-private use(s)"]
    if dp:
        lines.append(
            f"  {'stage':<20} {'mechanism':<9} {'records':>8} {'q':>9} {'sigma':>9} "
            f"{'steps/planned':>15} {'eps alone':>9}  data"
        )
    for e in dp:
        spent = e.mechanism_spent()
        alone = epsilon_for([spent], delta, accountant) if spent else 0.0
        lines.append(
            f"  {e.stage:<20} {e.mechanism:<9} {e.records:>8} {e.sample_rate:>9.4g} "
            f"{e.noise_multiplier:>9.4g} {f'{e.steps}/{e.planned_steps}':>15} {format_bound(alone):>9}  "
            f"{e.cache_id[:12] or '-'}"
        )
    if other:
        lines.append("Non-private uses of private data (outputs not released, not covered by ε):")
        lines += [f"  {e.stage:<20} {e.records:>8} records  {e.note}" for e in other]
    shaping = ledger.shaping_uses()
    if not_dp or shaping:
        lines.append("Total: epsilon = inf: NOT DP")
        lines += [
            f"  trained without DP on cache {cache_id}, which the ledger names as private"
            for cache_id in not_dp
        ]
        lines += [f"  non-private use '{e.stage}' may have shaped the weights" for e in shaping]
        return "\n".join(lines)
    lines.append(
        f"Total: epsilon = {format_bound(total)} at delta = {delta:g} "
        f"({accountant} accountant, all {len(dp)} mechanism(s) composed)"
    )
    if not math.isfinite(total):
        lines.append("  (unbounded: a mechanism has too little noise for the accountant)")
    return "\n".join(lines)
