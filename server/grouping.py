"""The batched engine's grouping on this simulation's workers: how many there are (on a Ray
cluster, known once Ray is up) and the memory each has (`fedlr.grouping` plans from them)."""

from __future__ import annotations

import os
from typing import Any

from fedlr.grouping import Grouping, plan_grouping
from fedlr.settings.schema import SimulationConfig


def free_memory(device: str) -> int:
    """Bytes free where the clients train: the GPU's, or this machine's available memory."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def count_workers(config: SimulationConfig) -> int:
    """Ray workers serving the simulated clients: the CPUs there are, by each worker's share
    (a cluster's, once this process is connected to it)."""
    cpus = os.cpu_count() or 1
    if config.ray_address is not None:
        import ray

        if ray.is_initialized():
            cpus = int(ray.cluster_resources().get("CPU", cpus))
    return max(1, int(cpus // config.worker_cpus))


def grouping_for(config: SimulationConfig, host: Any) -> Grouping | None:
    """This machine's grouping (on a cluster, the head's memory stands for each worker's)."""
    return plan_grouping(config, host, free_memory(host.device.type), count_workers(config))
