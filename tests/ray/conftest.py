"""A local Ray instance (2 CPUs, loopback only, no dashboard) with Serve, shared by the Ray tests."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest

# hypothesis is imported here, before Ray's threads exist: its pytest plugin imports it lazily at
# the end of the run, and CPython 3.11's parser has failed then with "AST constructor recursion
# depth mismatch" while Ray's threads were still winding down.

try:
    with warnings.catch_warnings():  # Ray's own import-time deprecation warnings (pydantic)
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve

        import mosel.ray  # noqa: F401
except ImportError:  # the ray extra is not installed (pip install -e '.[ray]'): nothing here runs
    collect_ignore_glob = ["test_*.py"]

from tests.ray.models import profiles

ROOT = Path(__file__).resolve().parents[2]
# Each replica reports its autoscaling signals this often (Serve's default is 10 s).
ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_AUTH_MODE": "disabled"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:  # Ray's deprecation warnings are Ray's business
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[None]:
    """Start Ray and Serve once per session; shut both down at the end."""
    os.environ.update(ENV)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # The replicas import this checkout's mosel (src/) and tests.ray.models (the root).
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **ENV}},
    )
    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def profile_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The models' synthetic profiles, saved as files the replicas load."""
    folder = tmp_path_factory.mktemp("profiles")
    paths = {}
    for name, profile in profiles().items():
        path = folder / f"{name}.profile.json"
        profile.save(path)
        paths[name] = str(path)
    return paths
