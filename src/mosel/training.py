"""Training a multi-modal model so that every configuration is usable: modality dropout.

A fusion head trained only on complete inputs is often poor when a modality is missing, so
mosel's cheap configurations would be useless. :func:`train_with_modality_dropout` trains
with random modality dropping: for each batch, with probability ``drop_probability``, the
fusion sees a random proper non-empty subset of the modalities instead of all of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mosel.spec import spec_of

__all__ = ["train_with_modality_dropout"]

Loss = Callable[[Tensor, Any], Tensor]


def train_with_modality_dropout(
    model: nn.Module,
    batches: Iterable[tuple[Mapping[str, Tensor], Any]]
    | Callable[[], Iterable[tuple[Mapping[str, Tensor], Any]]],
    *,
    epochs: int = 10,
    drop_probability: float = 0.5,
    train_branches: bool = True,
    loss: Loss | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` (a ``@mosel.multimodal`` module) with random modality dropping.

    Args:
        model: the model; trained in place and left in eval mode.
        batches: ``(inputs, target)`` pairs with every modality, or a callable returning a fresh
            iterable each epoch (e.g. a shuffling loader).
        epochs: passes over ``batches``.
        drop_probability: chance that a batch's fusion sees a random proper subset of the
            modalities (0 trains on complete inputs only).
        train_branches: False freezes the branches (e.g. pretrained encoders): their features
            are computed without gradients, the model stays in eval mode, only fusion learns.
        loss: ``loss(output, target) -> scalar``; default cross-entropy.
        optimizer: default Adam over the trainable parameters with learning rate ``lr``.
        lr: learning rate of the default optimizer.
        seed: seed of the modality choices.

    Returns:
        The mean loss of each epoch.
    """
    spec = spec_of(model)
    if not 0.0 <= drop_probability <= 1.0:
        raise ValueError(f"drop_probability must be in [0, 1], got {drop_probability}")
    loss_fn = loss or nn.functional.cross_entropy
    if optimizer is None:
        # Frozen branches get no gradients, and Adam skips parameters without one.
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    subsets: Sequence[frozenset[str]] = [c for c in spec.configurations if len(c) < len(spec.modalities)]
    fuse = getattr(model, spec.fusion)
    history = []
    # Frozen (pretrained) branches stay in eval mode so their batch-norm statistics do not move.
    model.train(train_branches)
    for _ in range(epochs):
        total, count = 0.0, 0
        for inputs, target in batches() if callable(batches) else batches:
            keep: frozenset[str] = frozenset(spec.modalities)
            if subsets and rng.random() < drop_probability:
                keep = rng.choice(subsets)
            with torch.set_grad_enabled(train_branches):
                features = {
                    m: getattr(model, spec.branches[m])(inputs[m]) for m in spec.modalities if m in keep
                }
            value = loss_fn(fuse(features), target)
            optimizer.zero_grad()
            value.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(value.detach())
            count += 1
        history.append(total / max(count, 1))
    model.eval()
    return history
