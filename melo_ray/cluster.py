"""Joining Ray: the cluster named by RAY_ADDRESS (a RayJob sets it), else a small local one."""
from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False,
                 object_store_memory=512 * 1024 * 1024)
