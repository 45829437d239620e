"""The :class:`Profile` value object: what mosel measured about one model on one device.

A profile holds per-branch and per-fusion latency tables, the accuracy of every configuration on
validation data, a check of the cost model against end-to-end runs, the model's fingerprint and
the plan built from all of it. It is saved as versioned JSON (never pickle).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import torch
from torch import nn

from mosel.errors import ProfileError
from mosel.plan import CostModel, Plan, accuracy_units, configuration_key, parse_configuration

__all__ = ["CostCheck", "Fingerprint", "LatencyTable", "Profile", "fingerprint_of"]

FORMAT: Final = "mosel.profile"
VERSION: Final = 1

Configuration = frozenset[str]


@dataclass(frozen=True, slots=True)
class LatencyTable:
    """Latency of one callable for batch sizes ``1..len(median_us)``, in microseconds.

    ``measured_sizes`` are the batch sizes actually timed; the others are interpolated linearly.
    Medians are made non-decreasing in batch size (a larger batch is never predicted faster).
    """

    median_us: tuple[float, ...]
    p95_us: tuple[float, ...]
    measured_sizes: tuple[int, ...]

    def at(self, batch_size: int) -> float:
        """Median latency for ``batch_size`` rows (0 rows cost nothing)."""
        return 0.0 if batch_size == 0 else self.median_us[batch_size - 1]

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
    def from_json(cls, data: Mapping[str, Any]) -> LatencyTable:
        """Inverse of :meth:`to_json`."""
        median = tuple(float(v) for v in data["median_us"])
        p95 = tuple(float(v) for v in data["p95_us"])
        if len(median) != len(p95) or not all(math.isfinite(v) and v >= 0 for v in median + p95):
            raise ValueError("latency table has mismatched lengths or bad values")
        return cls(median, p95, tuple(int(b) for b in data["measured_sizes"]))


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a profile was measured on: device, torch version, model class and weights."""

    device: str
    torch_version: str
    model_class: str
    parameter_checksum: str

    def to_json(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return {
            "device": self.device,
            "torch_version": self.torch_version,
            "model_class": self.model_class,
            "parameter_checksum": self.parameter_checksum,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        """Inverse of :meth:`to_json`."""
        return cls(
            str(data["device"]),
            str(data["torch_version"]),
            str(data["model_class"]),
            str(data["parameter_checksum"]),
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def fingerprint_of(model: nn.Module, model_class: str) -> Fingerprint:
    """Fingerprint a model: device, torch version, class and a checksum of its parameters.

    The checksum hashes names, shapes, dtypes and rounded float64 sums of each tensor, so it is
    cheap on any device and stable across devices for the same weights.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.numel() and (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32)):
                t = tensor.detach().to(torch.float64)
                digest.update(f"{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}".encode())
    return Fingerprint(
        device=_device_name(model_device(model)),
        torch_version=torch.__version__,
        model_class=model_class,
        parameter_checksum=digest.hexdigest()[:16],
    )


@dataclass(frozen=True, slots=True)
class CostCheck:
    """One end-to-end run of a strategy against its predicted latency."""

    groups: tuple[tuple[Configuration, int], ...]
    predicted_us: float
    measured_us: float

    @property
    def relative_error(self) -> float:
        """(measured - predicted) / predicted."""
        return (self.measured_us - self.predicted_us) / self.predicted_us


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

    def cost_model(self) -> CostModel:
        """The integer tables the planner uses."""
        return cost_model_of(self.modalities, self.branch_latency, self.fusion_latency, self.accuracy)

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
                }
                for check in self.cost_checks
            ],
            "plan": self.plan.to_json(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON (atomically: a crash never leaves a truncated file)."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read a profile written by :meth:`save`.

        Raises:
            ProfileError: the file is not valid JSON, not a mosel profile, of another format
                version, or inconsistent (e.g. its plan does not match its tables).
        """
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read profile {str(path)!r}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(
                f"{str(path)!r} is not valid JSON ({exc}); is it truncated? Re-create it with "
                f"mosel.profile(...).save(path)"
            ) from exc
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: Any, *, source: str = "<data>") -> Profile:
        """Build a profile from the dict :meth:`to_json` produced; see :meth:`load`."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(
                f'{source} is not a mosel profile (no "format": {FORMAT!r} field); '
                f"profiles are written by Profile.save"
            )
        if data.get("version") != VERSION:
            raise ProfileError(
                f"{source} has profile format version {data.get('version')!r}, this mosel reads "
                f"version {VERSION}; re-profile the model with this version"
            )
        try:
            profile = cls._parse(data)
        except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as exc:
            raise ProfileError(f"{source} is a malformed mosel profile: {type(exc).__name__}: {exc}") from exc
        if profile.plan.cost_model_digest != profile.cost_model().digest():
            raise ProfileError(
                f"{source}: the saved plan does not match the saved latency and accuracy tables "
                f"(edited by hand?); re-profile the model"
            )
        return profile

    @classmethod
    def _parse(cls, data: Mapping[str, Any]) -> Profile:
        modalities = tuple(str(m) for m in data["modalities"])
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"bad modality list {modalities!r}")

        def config(text: str) -> Configuration:
            return parse_configuration(text, modalities)

        max_batch = int(data["max_batch_size"])
        branch = {str(m): LatencyTable.from_json(t) for m, t in data["branch_latency"].items()}
        fusion = {config(k): LatencyTable.from_json(t) for k, t in data["fusion_latency"].items()}
        accuracy = {config(k): float(a) for k, a in data["accuracy"].items()}
        expected = {frozenset(c) for c in _subsets(modalities)}
        if set(branch) != set(modalities) or set(fusion) != expected or set(accuracy) != expected:
            raise ValueError("tables do not cover every modality and configuration")
        tables = list(branch.values()) + list(fusion.values())
        if max_batch < 1 or any(len(t.median_us) != max_batch for t in tables):
            raise ValueError("latency tables do not cover batch sizes 1..max_batch_size")
        if not all(0.0 <= a <= 1.0 for a in accuracy.values()):
            raise ValueError("accuracy outside [0, 1]")
        checks = tuple(
            CostCheck(
                tuple((config(c), int(k)) for c, k in item["groups"]),
                float(item["predicted_us"]),
                float(item["measured_us"]),
            )
            for item in data["cost_checks"]
        )
        plan = Plan.from_json(data["plan"])
        if plan.modalities != modalities or plan.max_batch_size != max_batch:
            raise ValueError("plan does not match the profile's modalities or sizes")
        return cls(
            modalities=modalities,
            max_batch_size=max_batch,
            branch_latency=MappingProxyType(branch),
            fusion_latency=MappingProxyType(fusion),
            accuracy=MappingProxyType(accuracy),
            sample_count=int(data["sample_count"]),
            fingerprint=Fingerprint.from_json(data["fingerprint"]),
            cost_checks=checks,
            plan=plan,
        )


def _subsets(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def cost_model_of(
    modalities: tuple[str, ...],
    branch_latency: Mapping[str, LatencyTable],
    fusion_latency: Mapping[Configuration, LatencyTable],
    accuracy: Mapping[Configuration, float],
) -> CostModel:
    """The planner's integer tables from measured latency and accuracy."""
    return CostModel(
        modalities=modalities,
        branch_us=MappingProxyType({m: branch_latency[m].integer_table() for m in modalities}),
        fusion_us=MappingProxyType({c: t.integer_table() for c, t in fusion_latency.items()}),
        accuracy=MappingProxyType({c: accuracy_units(a) for c, a in accuracy.items()}),
    )
