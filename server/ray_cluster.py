"""The Ray that `fedlr simulate`'s clients run on: this machine's own, or an existing cluster
(`ray_address`), what each worker reserves, and the environment the workers get.

Ray starts in a background thread (`RayStart`) while the driver loads the model and evaluates
round 0: `ray.init` mostly waits for its own processes, and the driver's loading runs on one core,
so the two overlap instead of adding up.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from fedlr.errors import FedlrError
from fedlr.settings.schema import SimulationConfig

# What the ClientApp's processes need from this process's environment. Ray workers get it through
# the job's runtime_env: on a cluster they are started by each machine's own Ray, not from here.
# The simulated nodes' folder and data file are not among them: `worker_environment` always sets
# them for the run.
WORKER_ENV = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")


def gpu_share() -> float:
    """Each of the os.cpu_count() workers gets an equal slice of one GPU, when there is one."""
    import torch

    return 1.0 / (os.cpu_count() or 1) if torch.cuda.is_available() else 0.0


def worker_resources(config: SimulationConfig) -> dict[str, float]:
    """What each Ray worker (one process serving simulated clients in turn) reserves."""
    gpus = gpu_share() if config.worker_gpus is None else config.worker_gpus
    return {"num_cpus": config.worker_cpus, "num_gpus": gpus}


def worker_environment(config: SimulationConfig, simulated: dict[str, str]) -> dict[str, str]:
    """What the workers get of this process's environment (WORKER_ENV), and by default as many
    threads as the CPUs a worker reserves, and `simulated`: where the simulated nodes keep their
    privacy ledgers and find their data, as a deployed node keeps its own (on a cluster: paths
    every machine shares). This process's own environment is left as it is: its torch may not
    have sized its thread pool yet."""
    env = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(config.worker_cpus))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return {**env, **simulated}


def ray_init_args(config: SimulationConfig, simulated: dict[str, str]) -> dict[str, Any]:
    """`ray.init`'s arguments: a local Ray with this machine's CPUs ("local": never a cluster
    that happens to run here), or the cluster at `ray_address`, whose machines declared their own
    resources. The workers get `worker_environment` and this process's sys.path (as Flower
    passes it)."""
    paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = worker_environment(config, simulated)
    args: dict[str, Any] = {
        "include_dashboard": False, "logging_level": "error", "log_to_driver": False,
        "runtime_env": {"env_vars": {**env, "PYTHONPATH": os.pathsep.join(paths)}},
    }
    if config.ray_address is None:
        return {**args, "address": "local", "num_cpus": os.cpu_count() or 1}
    return {**args, "address": config.ray_address}


def check_reachable(address: str | None) -> None:
    """A HOST:PORT cluster address answers, else one line now (Ray itself retries for minutes)."""
    import socket

    host, _, port = (address or "").rpartition(":")
    if "://" in (address or "") or not host or not port.isdigit():
        return  # unset, auto, or ray://: Ray finds or refuses it at once
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise FedlrError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start "
                         "one with `ray start --head --port 6379` (see the README), or leave "
                         "ray_address unset") from None


def start_ray(config: SimulationConfig, simulated: dict[str, str]) -> None:
    """Start (or join) the Ray this run's clients run on, and check that a worker fits on one
    of its nodes. Flower then finds Ray initialised and uses it as it is (its own `ray.init`
    could not take a runtime_env), and shuts it down at the end; a Ray this process was already
    connected to is left first, as Flower would at the end. Off the main thread `ray.init` sets
    no signal handler (it logs that it does not: not news here), so the caller's stay."""
    import ray

    ray.shutdown()
    quiet = logging.getLogger("ray._private.worker")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's own notice
        ray.init(**ray_init_args(config, simulated))
    except ConnectionError as exc:
        raise FedlrError(f"no Ray cluster at {config.ray_address}: {exc}; start one with `ray "
                         "start --head` (see the README), or leave ray_address unset") from None
    finally:
        quiet.setLevel(level)
    resources = worker_resources(config)
    fits = 0
    for node in ray.nodes():
        have = (node.get("Resources") or {}) if node.get("Alive") else {}
        count = int(have.get("CPU", 0) / resources["num_cpus"])
        if resources["num_gpus"] > 0:
            count = min(count, int(have.get("GPU", 0) / resources["num_gpus"]))
        fits += count
    if not fits:
        problem = (f"no Ray node can host a worker of {resources['num_cpus']:g} CPU and "
                   f"{resources['num_gpus']:g} GPU ({ray_cluster_resources(config)}); lower "
                   "worker_cpus or worker_gpus (--worker-cpus, --worker-gpus) and --resume")
        ray.shutdown()
        raise FedlrError(problem)


def ray_cluster_resources(config: SimulationConfig) -> str:
    import ray

    where = "this machine" if config.ray_address is None else f"the cluster at {config.ray_address}"
    total = ray.cluster_resources()
    return f"{where} has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU"


class RayStart:
    """`start_ray` in a background thread. `ready()` waits for it and raises what it raised;
    `stop()` shuts Ray down once `ray.init` is done, never while it is half done.

    The thread lives until `stop()`: Ray's own processes (GCS, raylet) are started with
    PR_SET_PDEATHSIG, which Linux fires when the *thread* that started them exits."""

    def __init__(self, config: SimulationConfig, simulated: dict[str, str]) -> None:
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(config, simulated), daemon=True,
                                       name="fedlr-ray-start")
        self.thread.start()

    def _run(self, config: SimulationConfig, simulated: dict[str, str]) -> None:
        try:
            start_ray(config, simulated)
        except BaseException as exc:  # raised in the caller's thread by ready()
            self.error = exc
        self.started.set()
        self.stopped.wait()

    def ready(self) -> None:
        self.started.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        import ray

        self.started.wait()
        ray.shutdown()
        self.stopped.set()
        self.thread.join()
