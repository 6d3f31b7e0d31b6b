"""Starting Ray the same way everywhere: join the cluster at ``RAY_ADDRESS`` (set by ``ray job
submit``), else start a fresh local instance sized for a laptop (``address="local"``, so a cluster
left running by ``ray start`` is never joined by accident)."""

from __future__ import annotations

import os

LOCAL_OBJECT_STORE_BYTES = 200 * 1024**2  # enough for MADDPG's weights; leaves RAM to the rest
# how often workers report metrics to the node's exporter (Ray's default is 10 s); the Serve app's
# GET /metrics shows counts this much later
METRICS_REPORT_INTERVAL_MS = 2000


def init_ray(num_cpus: int = 2) -> bool:
    """Start or join Ray unless it already runs; True when this call started it (shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
            _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
        )
    return True
