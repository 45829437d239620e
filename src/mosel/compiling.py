"""``torch.compile`` for a mosel model: compile what mosel runs (the branches and the fusion).

``torch.compile(model)`` wraps the model's ``forward``, which mosel never calls: the wrapper's
``infer`` would run the eager branches. :func:`compile_branches` compiles the marked methods
themselves, in place (the model stays the same ``nn.Module``, its ``state_dict`` unchanged), so
profiling and serving both run compiled code. Profile after compiling: the profile records
which branches were compiled, and a change of the compiled parts after ``attach`` is handled
like a move to another device (``attach(on_stale=...)``): refused by default (serving raises
:class:`mosel.ProfileMismatchError` and :func:`mosel.runtime.readiness` reports it), or
warned about, or re-profiled.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import torch
from torch import nn

from mosel.errors import SpecError
from mosel.spec import spec_of

__all__ = ["compile_branches", "compiled_parts", "unwrap_compiled"]

M = TypeVar("M", bound=nn.Module)
COMPILED_ATTR: Final = "_mosel_compiled"


def compile_branches(model: M, *, fusion: bool = False, **options: Any) -> M:
    """Compile every branch of ``model`` in place with ``torch.compile(**options)``.

    Returns ``model`` itself. Call it before :func:`mosel.profile`, so that the profile times the
    compiled code (the profiler's warm-up runs absorb the compilations). ``dynamic=True`` is the
    default (one compilation for every batch size, not one per size). The fusion is compiled
    only with ``fusion=True``: it is called with every subset of the modalities at every batch
    size, which exhausts torch's recompile limit (8) and then runs eager anyway; the branches
    hold the time. Compiling twice is a no-op.
    """
    spec = spec_of(model)
    options = {"dynamic": True, **options}
    names = (*spec.branches.values(), spec.fusion) if fusion else tuple(spec.branches.values())
    for name in names:
        method = getattr(model, name)
        if getattr(method, COMPILED_ATTR, False):
            continue
        compiled = torch.compile(method, **options)
        setattr(compiled, COMPILED_ATTR, True)
        setattr(model, name, compiled)  # an instance attribute: found before the class's method
    return model


def compiled_parts(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's branches and fusion that :func:`compile_branches` compiled."""
    spec = spec_of(model)
    names = (*spec.branches.values(), spec.fusion)
    return tuple(n for n in names if getattr(model.__dict__.get(n), COMPILED_ATTR, False))


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """``model`` itself; a ``torch.compile(model)`` wrapper is refused with what to do instead."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        raise SpecError(
            f"{type(original).__qualname__} was passed through torch.compile(model), which compiles "
            f"forward; mosel never calls forward, so it would serve the eager branches. Pass the "
            f"model itself, compiled with mosel.compile_branches(model) (its branches and fusion)"
        )
    return model
