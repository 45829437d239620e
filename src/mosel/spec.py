"""Declaring a multi-modal model: the ``modality``/``fusion`` markers and the ``multimodal`` collector.

The markers attach a small frozen :class:`Mark` to the function and return it unchanged. The class
decorator reads the marks once, at class definition, walking the MRO, and stores one frozen
:class:`ModelSpec` on the class as ``__mosel_spec__``. The class stays an ordinary ``nn.Module``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar

import optree
import torch
from torch import Tensor, nn

from mosel import trees
from mosel.errors import InputError, SpecError
from mosel.methods import PROVIDED, PROVIDED_ATTR
from mosel.trees import Tree

__all__ = ["Mark", "ModelSpec", "Padding", "Sizing", "fusion", "modality", "multimodal", "spec_of"]

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=type[nn.Module])

MARK_ATTR: Final = "__mosel_mark__"
SPEC_ATTR: Final = "__mosel_spec__"
RESERVED_NAMES: Final = tuple(PROVIDED)
_FORBIDDEN_CHARS: Final = frozenset("+,/ \t\n")
DEFAULT_BUCKETS: Final = tuple(2**i for i in range(17))
"""Size buckets of a modality declared with ``size=`` but no ``buckets=``: powers of two."""


@dataclass(frozen=True, slots=True)
class Padding:
    """How a sized modality's input is padded to a bucket edge (and cropped back to its rows' sizes).

    Declared with ``@mosel.modality(..., size=..., pad=mosel.Padding(...))``. Serving then pads
    every job's input up to its size bucket's edge, so that jobs of one bucket share a shape
    (kernels built per shape are reused, and the jobs merge into one batch); profiling times each
    bucket at its edge, from validation rows regrouped by their own size. The branch must ignore
    padded positions (through ``mask``, or because padding with ``value`` changes nothing):
    profiling warns when padding changes the model's output.

    Attributes:
        dim: the padded axis, counted on the batched tensors (e.g. ``1`` or ``-1`` for
            ``(batch, time)``); ``size(x)`` must return its extent. Every tensor of the input whose
            axis ``dim`` has that extent is padded; other tensors are left as they are.
        value: what padded positions hold: one number, or a mapping from the input's top-level
            keys (or tuple indices) to numbers, e.g. ``{"input_ids": tokenizer.pad_token_id}``
            (keys left out pad with 0).
        mask: the top-level key (or index) of the input's mask, nonzero at real positions; it is
            padded with 0 and tells each row's own size (so the profiler can crop rows of a
            batch padded longer than they are). None: every row is as long as its batch.
        side: ``"right"`` pads after the real positions, ``"left"`` before them.
    """

    dim: int = -1
    value: float | Mapping[str | int, float] = 0.0
    mask: str | int | None = None
    side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        where = f"mosel.Padding(dim={self.dim!r}, value={self.value!r}, mask={self.mask!r})"
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise SpecError(f"{where}: dim is the padded axis, an int (e.g. -1), got {self.dim!r}")
        values: Mapping[Any, Any] = self.value if isinstance(self.value, Mapping) else {None: self.value}
        for key, number in values.items():
            if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
                raise SpecError(f"{where}: value's keys are the input's keys or indices, got {key!r}")
            if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number):
                raise SpecError(f"{where}: pad values are finite numbers, got {number!r}")
        if self.mask is not None and (isinstance(self.mask, bool) or not isinstance(self.mask, (str, int))):
            raise SpecError(f"{where}: mask is the input's key (or index) of its mask, got {self.mask!r}")
        if isinstance(self.value, Mapping):
            if self.mask is not None and values.get(self.mask, 0) != 0:
                raise SpecError(f"{where}: the mask {self.mask!r} pads with 0 (padded positions are unreal)")
            object.__setattr__(self, "value", MappingProxyType(dict(self.value)))
        if self.side not in ("right", "left"):
            raise SpecError(f"{where}: side is 'right' or 'left', got {self.side!r}")

    def _fill(self, path: tuple[Any, ...]) -> float:
        value = self.value
        if not isinstance(value, Mapping):
            return 0.0 if path and path[0] == self.mask else float(value)
        return float(value.get(path[0], 0.0)) if path else 0.0

    def fit(self, x: Tree, width: int, size: int) -> Tree:
        """``x`` padded (or cropped) from ``width`` to ``size`` along :attr:`dim`.

        Cropping drops positions from the padded side: only right when every row's own size
        is at most ``size`` (see :meth:`lengths`).
        """
        if size == width:
            return x
        right = self.side == "right"

        def one(path: tuple[Any, ...], leaf: Tensor) -> Tensor:
            axis = self.dim + leaf.dim() if self.dim < 0 else self.dim
            if not 0 <= axis < leaf.dim() or leaf.shape[axis] != width:
                return leaf
            if size < width:
                return leaf.narrow(axis, 0 if right else width - size, size)
            shape = list(leaf.shape)
            shape[axis] = size - width
            fill = torch.full(shape, self._fill(path), dtype=leaf.dtype, device=leaf.device)
            return torch.cat((leaf, fill) if right else (fill, leaf), axis)

        if isinstance(x, Tensor):
            return one((), x)
        return optree.tree_map_with_path(one, x, none_is_leaf=False, namespace=trees.NAMESPACE)

    def lengths(self, modality: str, x: Tree, width: int, batch_dim: int) -> Tensor | None:
        """Each row's own size: up to its last real position in the mask (None without a mask).

        Raises:
            InputError: the input has no such mask, or the mask lacks the padded axis.
        """
        if self.mask is None:
            return None
        try:
            mask = None if isinstance(x, Tensor) else x[self.mask]
        except (KeyError, IndexError, TypeError):
            mask = None
        axis = -1 if not isinstance(mask, Tensor) else self.dim + mask.dim() if self.dim < 0 else self.dim
        if not isinstance(mask, Tensor) or not 0 <= axis < mask.dim() or mask.shape[axis] != width:
            raise InputError(
                f"modality {modality!r} declares padding with mask={self.mask!r}, but its input has no "
                f"mask tensor there whose axis {self.dim} is its size {width}; name the input's mask "
                f"(e.g. mask='attention_mask'), or mask=None"
            )
        rows = mask.shape[batch_dim]
        real = (mask != 0).movedim((batch_dim, axis), (0, 1)).reshape(rows, width, -1).any(-1)
        steps = torch.arange(1, width + 1, device=real.device)
        rank = steps if self.side == "right" else steps.flip(0)
        return (real * rank).amax(1).clamp(min=1).cpu()


@dataclass(frozen=True, slots=True)
class Sizing:
    """How the size that drives a branch's latency is read from a job's input, and bucketed.

    Attributes:
        size: ``size(batched_input) -> int``, e.g. the padded sequence length or the image side.
        buckets: ascending upper edges; a job of size ``s`` is priced at the first edge ``>= s``.
        padding: how the input is padded to its bucket's edge (None: jobs run at their own size).
    """

    size: Callable[[Any], int]
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    padding: Padding | None = None

    def read(self, modality: str, x: Any) -> int:
        """The size of ``modality``'s batched input ``x``.

        Raises:
            InputError: the size function failed or did not return a positive int.
        """
        try:
            value = self.size(x)
            size = operator.index(value)
        except Exception as exc:
            raise InputError(
                f"the size function of modality {modality!r} failed on its input "
                f"({type(exc).__name__}: {exc}); it must return a positive int (e.g. x.shape[-1])"
            ) from exc
        if size < 1:
            raise InputError(f"the size function of modality {modality!r} returned {size}; sizes are >= 1")
        return size


@dataclass(frozen=True, slots=True)
class Mark:
    """What a marker records on a function: a branch for ``modality``, or the fusion."""

    kind: Literal["modality", "fusion"]
    modality: str | None = None
    batch_dim: int = 0
    sizing: Sizing | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The modality branches and the fusion of a ``@mosel.multimodal`` class.

    Attributes:
        model_class: qualified name of the class the spec was collected from.
        modalities: modality names in declaration order (base classes first).
        branches: modality name -> name of the method that encodes it.
        fusion: name of the fusion method.
        configurations: every non-empty subset of ``modalities``, smallest first.
        batch_dims: modality -> the dimension of its input and features that holds the requests
            (0 unless declared, e.g. ``@mosel.modality("text", batch_dim=1)`` for (T, B, ...)).
        sizings: modality -> how its input size is read and bucketed, for the modalities
            declared with ``size=`` (their latency is profiled and priced per size bucket).
    """

    model_class: str
    modalities: tuple[str, ...]
    branches: Mapping[str, str]
    fusion: str
    configurations: tuple[frozenset[str], ...]
    batch_dims: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    sizings: Mapping[str, Sizing] = field(default_factory=lambda: MappingProxyType({}))

    def batch_dim(self, modality: str) -> int:
        """The request dimension of ``modality``'s input and features."""
        return self.batch_dims.get(modality, 0)


def _describe(mark: Mark) -> str:
    return "@mosel.fusion" if mark.kind == "fusion" else f"@mosel.modality({mark.modality!r})"


def _check_function(obj: object, decorator: str) -> None:
    if isinstance(obj, (staticmethod, classmethod, property)):
        raise SpecError(
            f"{decorator} must decorate a plain method 'def f(self, x)', got a "
            f"{type(obj).__name__}; branches and fusion are instance methods"
        )
    if not inspect.isfunction(obj):
        raise SpecError(f"{decorator} must decorate a function defined in a class body, got {obj!r}")
    previous: Mark | None = getattr(obj, MARK_ATTR, None)
    if previous is not None:
        raise SpecError(
            f"{obj.__qualname__!r} is already marked with {_describe(previous)}; a method is one branch "
            f"or the fusion, "
            f"not both: remove one of the decorators"
        )
    params = list(inspect.signature(obj).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    required_extra = [p.name for p in positional[2:] if p.default is p.empty]
    required_kw = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if (len(positional) < 2 and not varargs) or required_extra or required_kw:
        raise SpecError(
            f"{decorator} method {obj.__qualname__!r} must take exactly one argument after self "
            f"(the batched input), got signature {inspect.signature(obj)}"
        )


def modality(
    name: str,
    /,
    *,
    batch_dim: int = 0,
    size: Callable[[Any], int] | None = None,
    buckets: Sequence[int] | None = None,
    pad: Padding | None = None,
) -> Callable[[F], F]:
    """Mark a method as the branch (encoder) that computes modality ``name``.

    The method takes the modality's batched input (a tensor, or a dict/tuple/list of tensors)
    and returns its features, batched the same way. It is returned unchanged.

    Args:
        name: the modality's name (the key of its input in ``model.infer``).
        batch_dim: the dimension of every input and feature tensor of this modality that holds
            the requests: 0 (batch-first, the default) or, e.g., 1 for sequence-first (T, B, ...).
        size: for a branch whose latency depends on more than the number of requests, a
            function of the job's batched input returning its size (the padded sequence length,
            the image side). Latency is then profiled per size bucket, from the sizes the
            validation data holds, and each job is priced at its own bucket.
        buckets: ascending upper edges of the size buckets (default: powers of two).
        pad: how to pad the input along its sized axis (a :class:`Padding`): serving then pads
            each job to its bucket's edge, so that jobs of a bucket share one shape and merge,
            and profiling times every bucket the validation rows reach at its edge. Declare it
            when the branch ignores padded positions (a mask) and its features do not keep the
            padded axis.

    Example::

        @mosel.modality("audio")
        def encode_audio(self, audio): ...

        @mosel.modality("text", batch_dim=1)
        def encode_text(self, tokens): ...     # tokens: (T, B)

        @mosel.modality("text", size=lambda x: x["input_ids"].shape[-1], buckets=(16, 32, 64, 128))
        def encode_text(self, x): ...          # costs priced at the job's padded length

        @mosel.modality("audio", size=lambda x: x["input_values"].shape[1], buckets=(16000, 32000, 64000),
                        pad=mosel.Padding(dim=1, mask="attention_mask"))
        def encode_audio(self, x): ...         # each job padded to 1, 2 or 4 s of samples
    """
    if callable(name) and not isinstance(name, str):
        raise SpecError(
            f"@mosel.modality needs the modality's name: write @mosel.modality('audio') above "
            f"{getattr(name, '__qualname__', name)!r}, not bare @mosel.modality"
        )
    if not isinstance(name, str) or not name or _FORBIDDEN_CHARS & set(name):
        raise SpecError(
            f"a modality name must be a non-empty string without spaces, '+', ',' or '/', got {name!r}"
        )
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise SpecError(
            f"@mosel.modality({name!r}, batch_dim=...) takes a dimension index >= 0, got {batch_dim!r}"
        )
    sizing = None
    if pad is not None:
        _check_padding(name, pad, size, batch_dim)
    if size is not None or buckets is not None:
        if not callable(size):
            raise SpecError(
                f"@mosel.modality({name!r}, size=...) takes a function of the batched input returning "
                f"its size (e.g. lambda x: x.shape[-1]), got {size!r}"
                + ("; buckets= needs size= too" if size is None else "")
            )
        edges = tuple(DEFAULT_BUCKETS if buckets is None else buckets)
        if (
            not edges
            or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in edges)
            or any(a >= b for a, b in itertools.pairwise(edges))
        ):
            raise SpecError(
                f"@mosel.modality({name!r}, buckets=...) takes strictly ascending positive ints "
                f"(upper edges, e.g. (16, 32, 64, 128)), got {buckets!r}"
            )
        sizing = Sizing(size, edges, pad)
    mark = Mark("modality", name, batch_dim, sizing)

    def mark_branch(fn: F) -> F:
        _check_function(fn, f"@mosel.modality({name!r})")
        setattr(fn, MARK_ATTR, mark)
        return fn

    return mark_branch


def _check_padding(name: str, pad: object, size: object, batch_dim: int) -> None:
    if not isinstance(pad, Padding):
        raise SpecError(
            f"@mosel.modality({name!r}, pad=...) takes a mosel.Padding(dim=..., value=..., mask=...), "
            f"got {pad!r}"
        )
    if size is None:
        raise SpecError(
            f"@mosel.modality({name!r}, pad=...) needs size= too: jobs are padded to a size bucket's edge"
        )
    if pad.dim == batch_dim:
        raise SpecError(
            f"@mosel.modality({name!r}, pad=mosel.Padding(dim={pad.dim})): the padded axis is the "
            f"request axis (batch_dim={batch_dim}); give the sized axis, e.g. dim=-1"
        )


def fusion(fn: F, /) -> F:
    """Mark a method as the model's fusion.

    The method takes a ``Mapping[str, Tensor]`` holding the features of the modalities computed
    for these requests (only those), and returns the batched output, e.g. logits.
    """
    _check_function(fn, "@mosel.fusion")
    setattr(fn, MARK_ATTR, Mark("fusion"))
    return fn


def _wrapped_mark(value: object) -> Mark | None:
    """The mark of a function hidden inside a staticmethod, classmethod or property."""
    for inner in (getattr(value, "__func__", None), getattr(value, "fget", None)):
        mark = getattr(inner, MARK_ATTR, None)
        if isinstance(mark, Mark):
            return mark
    return None


def _collect(cls: type) -> ModelSpec:  # noqa: C901, PLR0912 (decoration-time checks, one per misuse, run once per class)
    branches: dict[str, str] = {}  # modality -> attribute name
    dims: dict[str, int] = {}
    sizings: dict[str, Sizing] = {}
    fusion_attr: str | None = None
    for base in reversed(cls.__mro__):
        own_modalities: dict[str, str] = {}
        own_fusion: str | None = None
        for attr, value in vars(base).items():
            if isinstance(value, (staticmethod, classmethod, property)):
                hidden = _wrapped_mark(value)
                if hidden is not None:
                    raise SpecError(
                        f"{base.__qualname__}.{attr} is a {type(value).__name__} wrapping a "
                        f"{_describe(hidden)} method; "
                        f"branches and fusion are plain instance methods 'def {attr}(self, x)': remove "
                        f"@{type(value).__name__}"
                    )
                continue
            mark: Mark | None = getattr(value, MARK_ATTR, None)
            if not isinstance(mark, Mark):
                continue
            if mark.kind == "fusion":
                if own_fusion is not None:
                    raise SpecError(
                        f"{base.__qualname__} marks two methods with @mosel.fusion: {own_fusion!r} and "
                        f"{attr!r}; a model has exactly one fusion, remove one of the marks"
                    )
                own_fusion = attr
                continue
            assert mark.modality is not None
            if mark.modality in own_modalities:
                raise SpecError(
                    f"{base.__qualname__} declares modality {mark.modality!r} twice: "
                    f"{own_modalities[mark.modality]!r} and {attr!r}; rename one of them"
                )
            own_modalities[mark.modality] = attr
            dims[mark.modality] = mark.batch_dim
            if mark.sizing is not None:
                sizings[mark.modality] = mark.sizing
            else:
                sizings.pop(mark.modality, None)
        # An attribute re-marked in a subclass drops what its name meant in the base.
        for attr in list(own_modalities.values()) + ([own_fusion] if own_fusion else []):
            for mod, old_attr in list(branches.items()):
                if old_attr == attr:
                    del branches[mod]
            if fusion_attr == attr:
                fusion_attr = None
        branches.update(own_modalities)
        if own_fusion is not None:
            fusion_attr = own_fusion
    if not branches:
        raise SpecError(
            f"{cls.__qualname__} declares no modality: mark each encoder with @mosel.modality('name')"
        )
    if fusion_attr is None:
        raise SpecError(
            f"{cls.__qualname__} has no fusion: mark the method that combines the features with @mosel.fusion"
        )
    if fusion_attr in branches.values():
        raise SpecError(f"{cls.__qualname__}.{fusion_attr} cannot be both a branch and the fusion")
    names = tuple(branches)
    configs = tuple(
        frozenset(combo) for r in range(1, len(names) + 1) for combo in itertools.combinations(names, r)
    )
    return ModelSpec(
        model_class=f"{cls.__module__}.{cls.__qualname__}",
        modalities=names,
        branches=MappingProxyType(dict(branches)),
        fusion=fusion_attr,
        configurations=configs,
        batch_dims=MappingProxyType({m: dims[m] for m in names if dims.get(m)}),
        sizings=MappingProxyType({m: sizings[m] for m in names if m in sizings}),
    )


def multimodal(cls: M, /) -> M:
    """Collect the ``modality`` and ``fusion`` marks of an ``nn.Module`` class.

    Runs once, at class definition. The class is returned unchanged but for ``__mosel_spec__`` and
    the serving methods ``infer``, ``submit`` and ``ainfer`` (:mod:`mosel.methods`). A class that
    defines one of those names itself is rejected rather than silently overwritten.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise SpecError(f"@mosel.multimodal decorates a torch.nn.Module subclass, got {cls!r}")
    spec = _collect(cls)
    missing = object()
    for name in RESERVED_NAMES:
        existing = inspect.getattr_static(cls, name, missing)
        if existing is not missing and not getattr(existing, PROVIDED_ATTR, False):
            raise SpecError(
                f"{cls.__qualname__} already defines {name!r}, which @mosel.multimodal adds for serving; "
                f"rename your {name!r} (mosel never overwrites user attributes)"
            )
    for name, fn in PROVIDED.items():
        setattr(cls, name, fn)
    setattr(cls, SPEC_ATTR, spec)
    return cls


def spec_of(model: nn.Module | type[nn.Module], /) -> ModelSpec:
    """Return the :class:`ModelSpec` of a ``@mosel.multimodal`` model instance or class."""
    cls = model if isinstance(model, type) else type(model)
    spec = getattr(cls, SPEC_ATTR, None)
    if not isinstance(spec, ModelSpec):
        raise SpecError(
            f"{cls.__qualname__} is not decorated with @mosel.multimodal; decorate the class and mark its "
            f"branches with @mosel.modality and its fusion with @mosel.fusion"
        )
    return spec
