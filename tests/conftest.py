from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mosel.testing import ToyAV, train_toy_av

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "examples", "ray"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def trained_toy() -> ToyAV:
    """A ToyAV trained once per session (a few seconds on a CPU)."""
    return train_toy_av(ToyAV())
