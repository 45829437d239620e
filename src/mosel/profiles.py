"""The :class:`Profile` value object: what mosel measured about one model on one device.

A profile holds per-branch and per-fusion latency tables, the accuracy of every configuration on
validation data, a check of the cost model against end-to-end runs, the model's fingerprint and
the plan built from all of it. It is saved as versioned JSON (never pickle).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import json
import math
import numbers
import os
import secrets
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from mosel.errors import ProfileError
from mosel.fingerprints import Fingerprint, fingerprint_of, model_device
from mosel.jsonvalues import json_dict, json_field, json_float, json_int, json_list, json_str, show
from mosel.plan import (
    CostModel,
    Plan,
    PlannerConfig,
    accuracy_units,
    build_plan,
    configuration_key,
    parse_configuration,
    repriced_plan,
)
from mosel.schema import ModalitySchema

__all__ = [
    "PRICED_AHEAD", "BucketKey", "CostCheck", "Fingerprint", "LatencyTable", "Profile", "SizedLatency",
    "bucket_edge", "fingerprint_of", "model_device", "plan_buckets", "priced_ahead",
]  # fmt: skip

FORMAT: Final = "mosel.profile"
VERSION: Final = 3
READS: Final = (2, 3)
"""Format versions this mosel reads: 3 added padded buckets, repeated-width tables, widths, fresh checks."""

Configuration = frozenset[str]
BucketKey = tuple[int, ...]
"""A job's size bucket: one bucket edge per sized modality, in the order of ``Profile.sized``."""
PRICED_AHEAD: Final = 64
"""At most this many size buckets are priced ahead by :func:`priced_ahead` (the rest on first use)."""


@dataclass(frozen=True, slots=True)
class LatencyTable:
    """Latency of one callable for batch sizes ``1..len(median_us)``, in microseconds.

    ``median_us`` is the table's central estimate: profiles of format 2 measured by this version
    keep the 10th percentile of the timed repeats (robust to a busy host; the online correction
    scales it to what serving meets), older ones the median. ``measured_sizes`` are the batch
    sizes actually timed; the others are interpolated linearly. Values are made non-decreasing in
    batch size (a larger batch is never predicted faster).
    """

    median_us: tuple[float, ...]
    p95_us: tuple[float, ...]
    measured_sizes: tuple[int, ...]

    def at(self, batch_size: int) -> float:
        """Median latency for ``batch_size`` rows (0 rows cost nothing)."""
        return 0.0 if batch_size == 0 else self.median_us[batch_size - 1]

    def scaled(self, factor: float) -> LatencyTable:
        """The table with every latency multiplied by ``factor`` (an extrapolation)."""
        return LatencyTable(
            tuple(v * factor for v in self.median_us),
            tuple(v * factor for v in self.p95_us),
            self.measured_sizes,
        )

    def integer_table(self) -> tuple[int, ...]:
        """Rounded-up microseconds for ``b = 0..max``; the planner's input."""
        return (0, *(math.ceil(v) for v in self.median_us))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "median_us": list(self.median_us),
            "p95_us": list(self.p95_us),
            "measured_sizes": list(self.measured_sizes),
        }

    @classmethod
    def from_json(cls, data: Any, *, what: str = "latency table", size: int | None = None) -> LatencyTable:
        """Inverse of :meth:`to_json`: a table of ``size`` batch sizes, when given.

        Raises:
            ValueError: ``data`` is malformed; the message names ``what``.
        """
        data = json_dict(data, what)
        median_us = json_list(json_field(data, "median_us", what), f"{what}.median_us", length=size)
        p95_us = json_list(json_field(data, "p95_us", what), f"{what}.p95_us", length=len(median_us))
        if not median_us:
            raise ValueError(f"{what} is empty")
        sizes = json_list(json_field(data, "measured_sizes", what), f"{what}.measured_sizes")
        return cls(
            tuple(json_float(v, f"{what}.median_us[]", low=0.0) for v in median_us),
            tuple(json_float(v, f"{what}.p95_us[]", low=0.0) for v in p95_us),
            tuple(json_int(b, f"{what}.measured_sizes[]", low=1, high=len(median_us)) for b in sizes),
        )


def bucket_edge(buckets: tuple[int, ...], size: int) -> int:
    """The first of ascending ``buckets`` that is ``>= size``; beyond the last, the next power of two."""
    i = bisect.bisect_left(buckets, size)
    if i < len(buckets):
        return buckets[i]
    return 1 << max(int(size) - 1, 0).bit_length()


@dataclass(frozen=True, slots=True)
class SizedLatency:
    """A branch's latency per input size bucket (a modality declared with ``size=``).

    Attributes:
        buckets: the declared upper edges of the size buckets, ascending.
        reference: the bucket that ``Profile.branch_latency`` and ``Profile.plan`` are for (the
            bucket of the first validation batch's longest row).
        tables: bucket edge -> latency table of the branch, for every bucket the validation
            rows reached (the reference included).
        padded: the tables were timed at each bucket's edge, the rows padded to it
            (:class:`mosel.Padding`): serving pads every job to its edge too.
        repeated: for a modality served at its jobs' own widths (not padded), bucket edge ->
            the branch's table at a width it ran before, where ``tables`` holds what a width it
            never ran costs (on a CPU, kernels are built per shape; a serving job is a new width,
            almost always), measured on the validation widths. Empty when padded, or when the
            validation data held one width per bucket.
        widths: bucket edge -> the input widths its timings ran at (the tables' own first).
    """

    buckets: tuple[int, ...]
    reference: int
    tables: Mapping[int, LatencyTable]
    padded: bool = False
    repeated: Mapping[int, LatencyTable] = field(default_factory=lambda: MappingProxyType({}))
    widths: Mapping[int, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))

    def edge(self, size: int) -> int:
        """The bucket of a job of ``size`` (see :func:`bucket_edge`)."""
        return bucket_edge(self.buckets, size)

    @property
    def largest(self) -> int:
        """The largest measured bucket: jobs beyond it are priced by extrapolation."""
        return max(self.tables)

    def measured(self, edge: int) -> tuple[int, float]:
        """The measured bucket that prices ``edge``, and the factor on its latencies.

        A measured bucket prices itself; otherwise the nearest measured one above (a job never
        priced below a size it was measured at); beyond the largest, the largest, scaled
        linearly by ``edge / largest`` (then learned online per bucket, see
        :class:`mosel.pricing.Pricer`).
        """
        if edge in self.tables:
            return edge, 1.0
        above = [e for e in self.tables if e >= edge]
        if above:
            return min(above), 1.0
        largest = max(self.tables)
        return largest, edge / largest

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "buckets": list(self.buckets),
            "reference": self.reference,
            "tables": {str(e): t.to_json() for e, t in sorted(self.tables.items())},
            "padded": self.padded,
            "repeated": {str(e): t.to_json() for e, t in sorted(self.repeated.items())},
            "widths": {str(e): list(w) for e, w in sorted(self.widths.items())},
        }

    @classmethod
    def from_json(cls, data: Any, *, what: str, size: int) -> SizedLatency:
        """Inverse of :meth:`to_json` (format 2: no padding, repeated, widths); ValueError naming it."""
        data = json_dict(data, what)
        buckets = tuple(
            json_int(e, f"{what}.buckets[]", low=1)
            for e in json_list(json_field(data, "buckets", what), f"{what}.buckets")
        )
        if not buckets or any(a >= b for a, b in itertools.pairwise(buckets)):
            raise ValueError(f"{what}.buckets must be strictly ascending, got {show(list(buckets))}")
        raw = json_dict(json_field(data, "tables", what), f"{what}.tables")
        tables = {
            _edge(key, f"{what}.tables"): LatencyTable.from_json(t, what=f"{what}.tables[{key!r}]", size=size)
            for key, t in raw.items()
        }
        reference = json_int(json_field(data, "reference", what), f"{what}.reference", low=1)
        if reference not in tables:
            raise ValueError(f"{what}.reference {reference} has no table")
        padded = _bool(data.get("padded", False), f"{what}.padded")
        repeated = {
            _edge(key, f"{what}.repeated"): LatencyTable.from_json(
                t, what=f"{what}.repeated[{key!r}]", size=size
            )
            for key, t in json_dict(data.get("repeated", {}), f"{what}.repeated").items()
        }
        widths = {
            _edge(text, f"{what}.widths"): tuple(
                json_int(w, f"{what}.widths[]", low=1) for w in json_list(ws, f"{what}.widths[{text!r}]")
            )
            for text, ws in json_dict(data.get("widths", {}), f"{what}.widths").items()
        }
        return cls(
            buckets,
            reference,
            MappingProxyType(tables),
            padded,
            MappingProxyType(repeated),
            MappingProxyType(widths),
        )


def _edge(text: str, what: str) -> int:
    edge = int(text) if text.isdigit() else -1
    if edge < 1:
        raise ValueError(f"{what} has a key {text!r} that is not a positive bucket edge")
    return edge


@dataclass(frozen=True, slots=True)
class CostCheck:
    """One end-to-end run of a strategy against its predicted latency.

    ``buckets`` is the size bucket it ran at (empty: the reference, ``Profile.branch_latency``);
    ``fresh``: it ran once, at input widths its branches had not run at before (what a job of a
    width never seen costs, for a sized modality that is not padded), against the tables that
    price new widths (:attr:`SizedLatency.tables`); otherwise it ran at the widths the tables
    were timed at, against the tables without that factor.
    """

    groups: tuple[tuple[Configuration, int], ...]
    predicted_us: float
    measured_us: float
    buckets: BucketKey = ()
    fresh: bool = False

    @property
    def relative_error(self) -> float:
        """(measured - predicted) / predicted."""
        return (self.measured_us - self.predicted_us) / self.predicted_us

    @classmethod
    def from_json(cls, item: Any, where: str, modalities: tuple[str, ...], max_batch: int) -> CostCheck:
        """One cost check of a profile's JSON; ValueError naming ``where`` on malformed data."""
        check = json_dict(item, where)
        groups = []
        for group in json_list(json_field(check, "groups", where), f"{where}.groups"):
            c, k = json_list(group, f"{where}.groups[]", length=2)
            groups.append(
                (
                    parse_configuration(json_str(c, f"{where}.groups[]"), modalities),
                    json_int(k, f"{where}.groups[] count", low=1, high=max_batch),
                )
            )
        return cls(
            tuple(groups),
            json_float(json_field(check, "predicted_us", where), f"{where}.predicted_us", low=0.0),
            json_float(json_field(check, "measured_us", where), f"{where}.measured_us", low=0.0),
            tuple(
                json_int(e, f"{where}.buckets[]", low=1)
                for e in json_list(check.get("buckets", []), f"{where}.buckets")
            ),
            _bool(check.get("fresh", False), f"{where}.fresh"),
        )


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {show(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Profile:
    """Measured latency and accuracy of a model on one device, and the plan built from them.

    Attributes:
        modalities: modality names in declaration order.
        max_batch_size: largest profiled (and planned) job size.
        branch_latency: modality -> latency table of its branch.
        fusion_latency: configuration -> latency table of fusion over that configuration.
        accuracy: configuration -> accuracy on the validation data.
        sample_count: number of validation requests each accuracy was measured on.
        fingerprint: what the profile was measured on.
        cost_checks: end-to-end runs of mixed strategies against their prediction.
        plan: the strategy frontiers for every job size.
        sized: modality -> its branch latency per size bucket, for the modalities declared
            with ``size=`` (empty for a fixed-shape model); ``branch_latency`` holds each one's
            reference bucket. Fusion is timed at the reference (fusion over pooled features does
            not depend on the input size; the cost checks at other buckets test that).
        sized_plans: the plan for every other combination of measured buckets.
        eager_latency: for each branch compiled with :func:`mosel.compile_branches` when
            profiled, its eager latency, timed in the same rounds (what compiling bought here).
        input_schema: modality -> dtype and shape of each tensor of its input, the sizes that
            agree and the integer value ranges, recorded from the validation data (see
            :mod:`mosel.schema`); empty for a profile saved before schemas were recorded, or for a
            modality whose batches disagreed.
    """

    modalities: tuple[str, ...]
    max_batch_size: int
    branch_latency: Mapping[str, LatencyTable]
    fusion_latency: Mapping[Configuration, LatencyTable]
    accuracy: Mapping[Configuration, float]
    sample_count: int
    fingerprint: Fingerprint
    cost_checks: tuple[CostCheck, ...]
    plan: Plan
    sized: Mapping[str, SizedLatency] = field(default_factory=lambda: MappingProxyType({}))
    sized_plans: Mapping[BucketKey, Plan] = field(default_factory=lambda: MappingProxyType({}))
    eager_latency: Mapping[str, LatencyTable] = field(default_factory=lambda: MappingProxyType({}))
    input_schema: Mapping[str, ModalitySchema] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for configuration, value in self.accuracy.items():
            _check_accuracy(configuration_key(configuration, self.modalities), value)

    def cost_model(self) -> CostModel:
        """The integer tables the planner uses."""
        return cost_model_of(self.modalities, self.branch_latency, self.fusion_latency, self.accuracy)

    @property
    def reference_bucket(self) -> BucketKey:
        """The bucket ``branch_latency`` and ``plan`` are for (``()`` for a fixed-shape model)."""
        return tuple(s.reference for s in self.sized.values())

    def bucket(self, sizes: Mapping[str, int]) -> BucketKey:
        """The bucket of a job whose sized modalities have ``sizes`` (missing: the reference)."""
        return tuple(s.edge(sizes[m]) if m in sizes else s.reference for m, s in self.sized.items())

    def priced_at(self, bucket: BucketKey) -> tuple[Plan, CostModel]:
        """The plan and the cost model for jobs of ``bucket`` (see :meth:`SizedLatency.measured`).

        The reference bucket gives ``plan`` and :meth:`cost_model`; a bucket measured in
        profiling, its own plan; a bucket beyond the measured ones, the plan of the largest
        measured bucket repriced at the scaled tables (:func:`mosel.plan.repriced_plan`: its
        strategies and every pure one, their Pareto subset; no solving).
        """
        if bucket == self.reference_bucket:
            return self.plan, self.cost_model()
        measured = tuple(s.measured(edge) for s, edge in zip(self.sized.values(), bucket, strict=True))
        key = tuple(edge for edge, _ in measured)
        plan = self.plan if key == self.reference_bucket else self.sized_plans[key]
        cost = self.cost_at(bucket)
        if any(factor != 1.0 for _, factor in measured):  # scaled tables: that plan's choices are not theirs
            plan = repriced_plan(plan, cost)
        return plan, cost

    def cost_at(self, bucket: BucketKey) -> CostModel:
        """The cost model for jobs of ``bucket``: each sized branch's table at that bucket."""
        branch = dict(self.branch_latency)
        for (m, sized), edge in zip(self.sized.items(), bucket, strict=True):
            used, factor = sized.measured(edge)
            branch[m] = sized.tables[used] if factor == 1.0 else sized.tables[used].scaled(factor)
        return cost_model_of(self.modalities, branch, self.fusion_latency, self.accuracy)

    def accuracy_bound(self, configuration: Configuration, confidence: float) -> float:
        """Lower ``confidence`` bound of a configuration's accuracy (one-sided Wilson score bound).

        The profile measured each accuracy on ``sample_count`` validation requests; with
        probability ``confidence`` the true accuracy is at least this. The Wilson bound treats
        the metric as a proportion (exact for top-1 correct/incorrect; for a metric with values
        in between it is conservative, as a Bernoulli has the largest variance for its mean).
        """
        p = self.accuracy[configuration]
        n = max(self.sample_count, 1)
        z = statistics.NormalDist().inv_cdf(confidence)
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
        return max(0.0, (centre - spread) / (1 + z * z / n))

    def accuracy_stderr(self, configuration: Configuration) -> float:
        """Standard error of a configuration's accuracy (binomial), for confidence bounds."""
        p = self.accuracy[configuration]
        return math.sqrt(max(p * (1 - p), 0.0) / max(self.sample_count, 1))

    def key(self, configuration: Configuration) -> str:
        """Text form of a configuration, e.g. ``"audio+video"``."""
        return configuration_key(configuration, self.modalities)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict in the versioned profile format."""
        key = self.key
        return {
            "format": FORMAT,
            "version": VERSION,
            "modalities": list(self.modalities),
            "max_batch_size": self.max_batch_size,
            "fingerprint": self.fingerprint.to_json(),
            "sample_count": self.sample_count,
            "accuracy": {key(c): a for c, a in self.accuracy.items()},
            "branch_latency": {m: t.to_json() for m, t in self.branch_latency.items()},
            "fusion_latency": {key(c): t.to_json() for c, t in self.fusion_latency.items()},
            "cost_checks": [
                {
                    "groups": [[key(c), k] for c, k in check.groups],
                    "predicted_us": check.predicted_us,
                    "measured_us": check.measured_us,
                    **({"buckets": list(check.buckets)} if check.buckets else {}),
                    **({"fresh": True} if check.fresh else {}),
                }
                for check in self.cost_checks
            ],
            "plan": self.plan.to_json(),
            **(
                {
                    "sized": {m: s.to_json() for m, s in self.sized.items()},
                    "sized_plans": [
                        {"buckets": list(k), "plan": p.to_json()} for k, p in self.sized_plans.items()
                    ],
                }
                if self.sized
                else {}
            ),
            **(
                {"eager_latency": {m: t.to_json() for m, t in self.eager_latency.items()}}
                if self.eager_latency
                else {}
            ),
            "input_schema": {m: s.to_json() for m, s in self.input_schema.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON, atomically: readers see the old file or the new one, whole.

        The text goes to a fresh temporary file next to ``path``, reaches the disk, then is
        renamed over ``path``; concurrent saves to one path each land whole (the last one wins).
        """
        target = Path(path)
        text = json.dumps(self.to_json(), indent=1)
        # Not tempfile.mkstemp: its mode 0600 would make every profile private, whatever the umask.
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read a profile written by :meth:`save`.

        Raises:
            ProfileError: the file is not valid JSON, not a mosel profile, of another format
                version, or inconsistent (e.g. its plan does not match its tables).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read profile {str(path)!r}: {exc}") from exc
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except RecursionError as exc:
            raise ProfileError(
                f"{str(path)!r} nests JSON too deeply to be a mosel profile; re-create it with "
                f"mosel.profile(...).save(path)"
            ) from exc
        except (ValueError, MemoryError) as exc:
            raise ProfileError(
                f"{str(path)!r} is not valid JSON ({exc}); is it truncated? Re-create it with "
                f"mosel.profile(...).save(path)"
            ) from exc
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: Any, *, source: str = "<data>") -> Profile:
        """Build a profile from the dict :meth:`to_json` produced; see :meth:`load`.

        Raises:
            ProfileError: ``data`` is not a valid profile; no other exception escapes.
        """
        try:
            return cls._from_json(data, source)
        except ProfileError:
            raise
        except Exception as exc:  # a hostile document must fail as a ProfileError, whatever breaks
            raise ProfileError(
                f"{source} is a malformed mosel profile ({type(exc).__name__}: {exc}); "
                f"re-create it with mosel.profile(...).save(path)"
            ) from exc

    @classmethod
    def _from_json(cls, data: Any, source: str) -> Profile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(
                f'{source} is not a mosel profile (no "format": {FORMAT!r} field); '
                f"profiles are written by Profile.save"
            )
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version not in READS:
            raise ProfileError(
                f"{source} has profile format version {show(version)}, this mosel reads "
                f"versions {', '.join(map(str, READS))}; re-profile the model with this version"
            )
        try:
            profile = cls._parse(data)
        except ValueError as exc:
            raise ProfileError(
                f"{source} is a malformed mosel profile: {exc}; "
                f"re-create it with mosel.profile(...).save(path)"
            ) from exc
        cost = profile.cost_model()
        plans = [(profile.plan, cost)] + [profile.priced_at(k) for k in profile.sized_plans]
        for plan, cost in plans:
            if plan.cost_model_digest != cost.digest():
                raise ProfileError(
                    f"{source}: a saved plan does not match the saved latency and accuracy tables "
                    f"(edited by hand?); re-profile the model"
                )
            try:
                plan.verify(cost)
            except ValueError as exc:
                raise ProfileError(
                    f"{source}: the saved plan does not match the saved tables (edited by hand?): {exc}; "
                    f"re-profile the model with mosel.profile(...) and save it again"
                ) from exc
        return profile

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> Profile:  # noqa: C901 (one check per field of the file, in the order read)
        """The profile in ``data``, its plan not yet checked; ValueError naming the bad field."""

        def field(key: str) -> Any:
            return json_field(data, key, "the profile")

        modalities = tuple(json_str(m, "modalities[]") for m in json_list(field("modalities"), "modalities"))
        if (
            not modalities
            or len(set(modalities)) != len(modalities)
            or any(not m or "+" in m for m in modalities)
        ):
            raise ValueError(f"modalities must be distinct names without '+', got {show(list(modalities))}")
        max_batch = json_int(field("max_batch_size"), "max_batch_size", low=1)
        count = (1 << len(modalities)) - 1

        def table(text: str, configurations: int) -> dict[Configuration, Any]:
            # Sizes are checked before anything is enumerated or built from them.
            raw = json_dict(field(text), text)
            if len(raw) != configurations:
                raise ValueError(
                    f"{text} has {len(raw)} entries, {len(modalities)} modalities need {show(count)}"
                )
            out = {parse_configuration(k, modalities): v for k, v in raw.items()}
            if len(out) != len(raw):
                raise ValueError(f"{text} lists a configuration twice: {show(sorted(raw))}")
            return out

        accuracy = {
            c: json_float(a, f"accuracy[{configuration_key(c, modalities)!r}]", low=0.0, high=1.0)
            for c, a in table("accuracy", count).items()
        }
        branch_raw = json_dict(field("branch_latency"), "branch_latency")
        if set(branch_raw) != set(modalities):
            raise ValueError(
                f"branch_latency must have one table per modality {list(modalities)}, "
                f"got {show(sorted(branch_raw))}"
            )
        branch = {
            m: LatencyTable.from_json(branch_raw[m], what=f"branch_latency[{m!r}]", size=max_batch)
            for m in modalities
        }
        fusion = {
            c: LatencyTable.from_json(
                t, what=f"fusion_latency[{configuration_key(c, modalities)!r}]", size=max_batch
            )
            for c, t in table("fusion_latency", count).items()
        }
        checks = [
            CostCheck.from_json(item, f"cost_checks[{i}]", modalities, max_batch)
            for i, item in enumerate(json_list(field("cost_checks"), "cost_checks"))
        ]

        def plan_of(value: Any, what: str) -> Plan:
            plan = Plan.from_json(value)
            if plan.modalities != modalities or plan.max_batch_size != max_batch:
                raise ValueError(
                    f"{what} is for modalities {show(list(plan.modalities))} and max_batch_size "
                    f"{show(plan.max_batch_size)}, the profile for {list(modalities)} and {show(max_batch)}"
                )
            return plan

        plan = plan_of(field("plan"), "the plan")
        sized, sized_plans = _parse_sized(data, modalities, max_batch, plan_of)
        eager_raw = json_dict(data.get("eager_latency", {}), "eager_latency")
        if not set(eager_raw) <= set(modalities):
            unknown = sorted(set(eager_raw) - set(modalities))
            raise ValueError(f"eager_latency names unknown modalities {show(unknown)}")
        eager = {
            m: LatencyTable.from_json(t, what=f"eager_latency[{m!r}]", size=max_batch)
            for m, t in eager_raw.items()
        }
        schema_raw = json_dict(data.get("input_schema", {}), "input_schema")  # absent before schemas
        unknown = [m for m in schema_raw if m not in modalities]
        if unknown:
            raise ValueError(f"input_schema names modalities {show(unknown)} the profile does not have")
        schema = {m: ModalitySchema.from_json(v, f"input_schema[{m!r}]") for m, v in schema_raw.items()}
        return cls(
            modalities=modalities,
            max_batch_size=max_batch,
            branch_latency=MappingProxyType(branch),
            fusion_latency=MappingProxyType(fusion),
            accuracy=MappingProxyType(accuracy),
            sample_count=json_int(field("sample_count"), "sample_count", low=0),
            fingerprint=Fingerprint.from_json(field("fingerprint")),
            cost_checks=tuple(checks),
            plan=plan,
            sized=MappingProxyType(sized),
            sized_plans=MappingProxyType(sized_plans),
            eager_latency=MappingProxyType(eager),
            input_schema=MappingProxyType(schema),
        )


def _parse_sized(
    data: Mapping[str, Any], modalities: tuple[str, ...], max_batch: int, plan_of: Callable[[Any, str], Plan]
) -> tuple[dict[str, SizedLatency], dict[BucketKey, Plan]]:
    """A profile's per-size-bucket tables and plans (absent before size buckets: none)."""
    sized_raw = json_dict(data.get("sized", {}), "sized")
    if not set(sized_raw) <= set(modalities):
        unknown = sorted(set(sized_raw) - set(modalities))
        raise ValueError(f"sized names unknown modalities {show(unknown)}")
    sized = {
        m: SizedLatency.from_json(sized_raw[m], what=f"sized[{m!r}]", size=max_batch)
        for m in modalities
        if m in sized_raw
    }
    sized_plans = {}
    for i, item in enumerate(json_list(data.get("sized_plans", []), "sized_plans")):
        where = f"sized_plans[{i}]"
        entry = json_dict(item, where)
        key = tuple(
            json_int(e, f"{where}.buckets[]", low=1)
            for e in json_list(json_field(entry, "buckets", where), f"{where}.buckets", length=len(sized))
        )
        if any(e not in s.tables for e, s in zip(key, sized.values())):
            raise ValueError(f"{where}.buckets {show(list(key))} are not all measured buckets")
        sized_plans[key] = plan_of(json_field(entry, "plan", where), where)
    missing = [
        k for k in itertools.product(*(sorted(s.tables) for s in sized.values()))
        if k not in sized_plans and k != tuple(s.reference for s in sized.values())
    ]  # fmt: skip
    if sized and missing:
        lacking = show([list(k) for k in missing])
        raise ValueError(f"sized_plans lacks a plan for measured buckets {lacking}")
    return sized, sized_plans


def plan_buckets(profile: Profile, planner: PlannerConfig | None = None) -> Profile:
    """``profile`` with a plan for every combination of measured size buckets but the reference."""
    plans = {
        key: build_plan(profile.cost_at(key), planner)
        for key in itertools.product(*(sorted(s.tables) for s in profile.sized.values()))
        if key != profile.reference_bucket
    }
    return dataclasses.replace(profile, sized_plans=MappingProxyType(plans))


def priced_ahead(
    profile: Profile, declared: Mapping[str, Sequence[int]], limit: int = PRICED_AHEAD
) -> dict[BucketKey, tuple[Plan, CostModel]]:
    """:meth:`Profile.priced_at` for every bucket of the ``declared`` sizes, computed ahead (offline).

    ``declared``: sized modality -> the sizes its jobs may have (its ``buckets=`` edges). Every
    combination of their buckets, each sized modality's reference included (a job without it, or
    a modality not in ``declared``), is priced but the reference bucket; the smallest combinations
    first, at most ``limit`` of them. A bucket beyond the measured ones costs a repriced plan
    (milliseconds); paid here, at attach, no job of a declared bucket pays it while serving.
    """
    edges = [
        sorted({s.reference} | {s.edge(size) for size in declared.get(m, ())})
        for m, s in profile.sized.items()
    ]
    # Smaller buckets first: by the sum of the edges' ranks, generated in that order so that only
    # the first ``limit`` combinations are ever built (not every one of a product of many edges).
    keys = (
        tuple(e[i] for e, i in zip(edges, rank, strict=True))
        for rank in _ranks_by_sum([len(e) for e in edges])
    )
    chosen = itertools.islice((key for key in keys if key != profile.reference_bucket), max(limit, 0))
    return {key: profile.priced_at(key) for key in chosen}


def _ranks_by_sum(lengths: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every index tuple of ``lengths`` (an index per length), by increasing sum, lexicographic within one."""
    room = [sum(n - 1 for n in lengths[k:]) for k in range(len(lengths) + 1)]  # the most the rest can add

    def summing(k: int, total: int) -> Iterator[tuple[int, ...]]:
        if k == len(lengths):
            yield ()
            return
        for i in range(max(total - room[k + 1], 0), min(lengths[k] - 1, total) + 1):
            for rest in summing(k + 1, total - i):
                yield (i, *rest)

    for total in range(room[0] + 1):
        yield from summing(0, total)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a profile may hold")


def _check_accuracy(key: str, value: object) -> None:
    """ProfileError unless ``value`` is a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ProfileError(
            f"the accuracy of configuration {key!r} is {show(value)}; accuracies must be finite numbers in "
            f"[0, 1]: re-profile with a metric that scores each request in [0, 1]"
        )


def _subsets(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def cost_model_of(
    modalities: tuple[str, ...],
    branch_latency: Mapping[str, LatencyTable],
    fusion_latency: Mapping[Configuration, LatencyTable],
    accuracy: Mapping[Configuration, float],
) -> CostModel:
    """The planner's integer tables from measured latency and accuracy.

    Raises:
        ProfileError: an accuracy is not a finite number in [0, 1].
    """
    for configuration, value in accuracy.items():
        _check_accuracy(configuration_key(configuration, modalities), value)
    return CostModel(
        modalities=modalities,
        branch_us=MappingProxyType({m: branch_latency[m].integer_table() for m in modalities}),
        fusion_us=MappingProxyType({c: t.integer_table() for c, t in fusion_latency.items()}),
        accuracy=MappingProxyType({c: accuracy_units(a) for c, a in accuracy.items()}),
    )
