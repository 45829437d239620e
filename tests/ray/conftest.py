"""A local Ray instance (2 CPUs, loopback only, no dashboard) with Serve, shared by the Ray tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
from ray import serve  # noqa: E402

from tests.ray.models import profiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# Each replica reports its autoscaling signals this often (Serve's default is 10 s).
ENV = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[None]:
    """Start Ray and Serve once per session; shut both down at the end."""
    os.environ.update(ENV)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **ENV}},
    )
    serve.start(http_options={"location": "NoServer"})
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
