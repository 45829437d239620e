"""A caller's call as a job: inputs and presence masks checked, SLO validated, rows grouped, priced.

:class:`Requests` is built once per served model (when its server starts) with what does not
depend on the call: the modalities, their batch dimensions, the sized ones, the device. Each call
then costs the checks of its own values: :meth:`Requests.job`. A sized modality declared with
``pad=`` has each job's input padded to its size bucket's edge there, before the job's batch key
is taken, so that jobs of one bucket share a shape and merge.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Final

import optree
import torch
from torch import Tensor

from mosel import trees
from mosel.errors import InputError, MoselWarning
from mosel.execution import Work
from mosel.jobs import BucketKey, Job
from mosel.plan import CostModel, Plan
from mosel.profiles import Profile
from mosel.slo import SLO
from mosel.spec import ModelSpec, Padding
from mosel.trees import Tree

__all__ = ["WARNED_BUCKETS", "Requests", "check_inputs", "group_by_presence"]

Configuration = frozenset[str]
Flat = tuple[list[Any], optree.PyTreeSpec]
WARNED_BUCKETS: Final = 64
"""Size buckets beyond the measured ones warned about per served model (once each); then no more."""


class Requests:
    """How one served model turns a call into a :class:`~mosel.jobs.Job`.

    Args:
        spec: the model's spec.
        profile: its profile (which modalities are priced per input size).
        device: the model's device now (read per call: ``.to()`` moves it).
        float_dtype: the float dtype the model moved to since it was profiled, if it did (its
            float inputs take it rather than the profile's).
        plan_outside_lock: the plan and cost model of a size bucket, computed outside any lock
            (:meth:`mosel.pricing.Pricer.plan_outside_lock`).
    """

    def __init__(
        self,
        spec: ModelSpec,
        profile: Profile,
        device: Callable[[], torch.device],
        plan_outside_lock: Callable[[BucketKey], tuple[Plan, CostModel]],
        float_dtype: Callable[[], torch.dtype | None] = lambda: None,
    ) -> None:
        self.spec = spec
        self.profile = profile
        self.device = device
        self.plan_outside_lock = plan_outside_lock
        self.sized = tuple((m, spec.sizings[m]) for m in profile.sized if m in spec.sizings)
        self.schemas = dict(profile.input_schema)
        self.float_dtype = float_dtype
        self.batch_dims = {m: spec.batch_dim(m) for m in spec.modalities}
        # Per sized modality of the profile, in its order: the padding declared, the largest bucket measured.
        self.edges = tuple(
            (m, spec.sizings[m].padding if m in spec.sizings else None, s.largest)
            for m, s in profile.sized.items()
        )
        self.warned: set[tuple[str, int]] = set()

    def job(
        self, inputs: object, slo: SLO, present: object, arrival: float, future: Future[Any] | None = None
    ) -> Job[Work]:
        """The job of one call, its tensors and ``future`` (the caller's, if any) in its :class:`Work`.

        Raises:
            InputError: bad inputs or presence masks (see :func:`check_inputs`,
                :func:`group_by_presence`), or a size a sized modality cannot read.
        """
        spec = self.spec
        device = self.device()
        tensors, available, n, flats = _checked(inputs, spec, device)
        if self.schemas:
            self._conform(tensors, flats)
        tensors, groups, order = group_by_presence(tensors, available, n, present, spec)
        if order is not None:
            flats = {}
        bucket = priced = None
        if self.sized:
            sizes = {m: how.read(m, tensors[m]) for m, how in self.sized if m in tensors}
            bucket = self.profile.bucket(sizes)
            # Here, before the driver's lock: a bucket beyond the measured ones may reprice a plan.
            priced = self.plan_outside_lock(bucket)
            for (m, padding, largest), edge in zip(self.edges, bucket, strict=True):
                size = sizes.get(m)
                if size is None:
                    continue
                if padding is not None and edge > size:
                    tensors[m] = _padded(m, padding, tensors[m], size, edge)
                    flats.pop(m, None)
                if edge > largest and (m, edge) not in self.warned:
                    self._warn_beyond(m, size, edge, largest)
        dims = self.batch_dims
        key = []
        for m, t in tensors.items():
            key.append((m, trees.signature(t, dims[m], flats.get(m))))
        return Job(
            n=n,
            available=available,
            arrival=arrival,
            slo=slo,
            payload=Work(future, tensors, order, device),
            groups=groups,
            batch_key=tuple(key),
            bucket=bucket,
            priced=priced,
        )

    def _conform(self, tensors: dict[str, Tree], flats: dict[str, Flat]) -> None:
        """Each input checked against its schema, its dtypes made to fit (a changed one loses its flat)."""
        schemas = self.schemas
        moved = self.float_dtype()  # a model moved to another float dtype (on_stale="warn")
        for m, tree in tensors.items():
            schema = schemas.get(m)
            if schema is not None:
                tensors[m] = fitted = schema.conform(m, tree, float_dtype=moved, flat=flats.get(m))
                if fitted is not tree:
                    flats.pop(m, None)

    def _warn_beyond(self, modality: str, size: int, edge: int, largest: int) -> None:
        """Once per bucket (at most :data:`WARNED_BUCKETS` of them): a job beyond the measured buckets."""
        if len(self.warned) >= WARNED_BUCKETS:
            return
        self.warned.add((modality, edge))
        warnings.warn(
            f"a job of {self.spec.model_class} has modality {modality!r} at size {size} (bucket {edge}), "
            f"beyond the largest bucket its profile measured ({largest}): it is priced at that bucket's "
            f"latency scaled by {edge / largest:.3g} (linear in size), corrected online from this bucket's "
            f"own runs. Profile with validation rows this long to measure it (warned once per bucket)",
            MoselWarning,
            stacklevel=6,  # here < job < Server.infer/submit < the runtime < model.infer/submit < the caller
        )


def _padded(modality: str, padding: Padding, x: Tree, size: int, edge: int) -> Tree:
    try:
        return padding.fit(x, size, edge)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(
            f"inputs[{modality!r}] could not be padded from {size} to its size bucket's edge {edge} "
            f"({type(exc).__name__}: {exc}); check it against the modality's pad=mosel.Padding(...)"
        ) from exc


def group_by_presence(
    tensors: dict[str, Tree], available: Configuration, n: int, present: object, spec: ModelSpec
) -> tuple[dict[str, Tree], tuple[tuple[Configuration, int], ...], Tensor | None]:
    """Rows grouped by the modalities each has, from a per-row presence mask.

    ``present`` maps modality names to a bool tensor of ``n`` (row ``i`` has the modality when
    ``present[m][i]``); a modality left out of it is present in every row that has it in
    ``tensors``. Returns the inputs with rows reordered so that each group is contiguous (a
    stable order: rows keep their order within a group), the groups as (modalities, rows), and
    the index that puts outputs back into the caller's row order (None: no reordering).

    Raises:
        InputError: a mask for a modality not in the inputs, not a bool tensor of ``n`` rows, or
            a row left with no modality.
    """
    if present is None:
        return tensors, ((available, n),), None
    if not isinstance(present, Mapping):
        raise InputError(
            f"present must map modality names to bool tensors of {n} rows, got {type(present).__name__}"
        )
    masks: dict[str, Tensor] = {}
    for m, mask in present.items():
        if m not in available:
            raise InputError(
                f"present[{m!r}]: {m!r} is not among the inputs' modalities {sorted(available)}; a mask "
                f"marks which rows of a given modality are real"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            what = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise InputError(f"present[{m!r}] must be a bool tensor of shape ({n},), got {what}")
        masks[m] = mask.detach().cpu()
    columns = [m for m in spec.modalities if m in available]
    bits = torch.zeros(n, dtype=torch.int64)
    for i, m in enumerate(columns):
        has = masks.get(m)
        bits |= (torch.ones(n, dtype=torch.int64) if has is None else has.to(torch.int64)) << i
    empty = torch.nonzero(bits == 0).flatten()
    if len(empty):
        raise InputError(f"present leaves row {int(empty[0])} with no modality; every request needs one")
    keys, counts = torch.unique(bits, return_counts=True)
    groups = tuple(
        (frozenset(m for i, m in enumerate(columns) if int(key) >> i & 1), int(count))
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True)
    )
    if len(groups) == 1:
        return tensors, groups, None
    order = torch.argsort(bits, stable=True)
    reordered = {m: trees.take(t, order.to(trees.device(t)), spec.batch_dim(m)) for m, t in tensors.items()}
    return reordered, groups, torch.argsort(order)


def check_inputs(
    inputs: object, spec: ModelSpec, device: torch.device
) -> tuple[dict[str, Tree], Configuration, int]:
    """Validate a job's inputs; returns them on ``device``, the modalities present, the size.

    A modality's input is a tensor or a (nested) dict/tuple/list of tensors whose first dimension
    is the request dimension; None (or leaving the modality out) means "not available".
    """
    tensors, available, n, _ = _checked(inputs, spec, device)
    return tensors, available, n


def _on_device(leaves: list[Any], structure: optree.PyTreeSpec, device: torch.device) -> Flat:
    """A tree's leaves on ``device`` (the same list when all are there already)."""
    if all(t.device == device for t in leaves):
        return leaves, structure
    return [t if t.device == device else t.to(device, non_blocking=True) for t in leaves], structure


def _checked(  # noqa: C901 (one refusal per way inputs can be wrong; the fast path first)
    inputs: object, spec: ModelSpec, device: torch.device
) -> tuple[dict[str, Tree], Configuration, int, dict[str, Flat]]:
    """:func:`check_inputs`, and each tree input's :func:`mosel.trees.flatten` (walked once a call)."""
    if type(inputs) is not dict and not isinstance(inputs, Mapping):
        raise InputError(
            f"inputs must map modality names to tensors, e.g. {{{spec.modalities[0]!r}: tensor}}, "
            f"got {type(inputs).__name__}"
        )
    branches = spec.branches
    for key in inputs:
        if key not in branches:
            raise InputError(
                f"unknown modality {key!r} in inputs; {spec.model_class} declares {list(spec.modalities)}"
            )
    tensors: dict[str, Tree] = {}
    sizes: dict[str, int] = {}
    flats: dict[str, Flat] = {}
    dims = spec.batch_dims
    for m in spec.modalities:
        value = inputs.get(m)
        if value is None:
            continue
        dim = dims.get(m, 0)
        if isinstance(value, Tensor) and value.dim() > dim:
            sizes[m] = value.shape[dim]
            tensors[m] = value if value.device == device else value.to(device, non_blocking=True)
            continue
        try:
            if isinstance(value, Tensor):  # a scalar, or too few dimensions: no batch dimension
                trees.check(value, dim)
            leaves, structure = trees.flatten(value)
            sizes[m] = trees.rows(leaves, value, dim)
        except trees.TreeError as exc:
            kind = "a scalar" if isinstance(value, Tensor) else f"a {type(value).__name__}"
            raise InputError(
                f"inputs[{m!r}] is {kind} mosel cannot split into requests: {exc}; it must be a "
                f"torch.Tensor (or a dict/tuple/list of tensors) whose dimension {dim} is the "
                f"request dimension"
            ) from None
        flats[m] = flat = _on_device(leaves, structure, device)
        tensors[m] = value if flat[0] is leaves else optree.tree_unflatten(structure, flat[0])
    if not tensors:
        raise InputError(f"inputs hold none of the modalities {list(spec.modalities)}")
    counts = iter(sizes.values())
    n = next(counts)
    for rows in counts:
        if rows != n:
            raise InputError(
                f"inputs disagree on the number of requests (each modality's batch dimension): {sizes}"
            )
    if n == 0:
        raise InputError("inputs hold zero requests; the first dimension must be at least 1")
    return tensors, frozenset(tensors), n, flats
