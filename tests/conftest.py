"""Shared fixtures: a real local Ray sized for this 2-core machine, shut down after its module."""

import pytest
import ray

from deepslicing.ray_runtime import init_ray


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray (2 CPUs, small object store), never a cluster left running elsewhere."""
    assert not ray.is_initialized()
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
