"""The two engines' training in one process, without Flower or Ray: one round of a group of
clients trained one by one (`LocalTrainer`, as a worker of the per-client engine trains them) and
together (`GroupTrainer`, one batched group), on each device here: the CPU always, CUDA too when
present. It measures what the engines' training costs, not Flower's carrying of one message per
client, which `benchmarks/simulation.py` adds on top; and it runs where Ray cannot (the GPU
machines lent to this project have no Ray, `scripts/device-check.sh`).

The job is the tiny preset's of `benchmarks/simulation.py` (ffa, ranks 4 and 8, batch 8, 5 local
steps), with and without DP-SGD (sigma 1, C 1), for a group of `--clients` (64 by default: the
issue's CUDA target, batched >= 10x per-client at 64 clients per group). Each engine runs once
to warm up, then `--repeats` times in turns; the median counts. Without DP both engines must
give every client the same adapter (the largest difference is reported: 0 up to float32
rounding, the tests check it in float64).

Writes benchmarks/results/engines.json, keeping the entries of devices not run this time.
Run: python benchmarks/engines.py [--clients 64 --local-steps 5 --repeats 3 --devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fedlr.client.group_training import GroupJob, GroupTrainer
from fedlr.client.training import ClientOptions, LocalTrainer, TrainResult
from fedlr.federation import Federation
from fedlr.privacy.sample_level import PrivacyLedger
from fedlr.settings.schema import SimulationConfig

RESULTS = Path(__file__).parent / "results" / "engines.json"
JOB = {"model": "tiny", "strategy": "ffa", "ranks": [4, 8], "batch_size": 8, "seed": 0,
       "rounds": 1}
TARGET_CUDA_SPEEDUP = 10.0


class Round:
    """One round of `clients` clients on `device`: the same downlinks, data and options for
    both engines."""

    def __init__(self, clients: int, local_steps: int, dp: bool, device: str) -> None:
        settings = {**JOB, "num_clients": clients, "local_steps": local_steps}
        if dp:
            settings.update(noise_multiplier=1.0, max_grad_norm=1.0)
        self.config = SimulationConfig.load(None, settings)
        self.fed = Federation.build(self.config, device)
        self.trainer = LocalTrainer(self.fed.model.host, self.config.train_config())
        strategy = self.fed.strategy
        self.state = strategy.init_state(self.fed.model.host.initial_head)
        self.clients = self.config.client_ids()
        self.device = torch.device(self.fed.model.host.device)

    def job(self, client: str) -> GroupJob:
        strategy, dp = self.fed.strategy, self.config.train_config().dp
        options = ClientOptions(rank=strategy.spec.ranks[client], train_a=strategy.trains_a,
                                train_head=strategy.trains_head, seed=int(client),
                                ledger=PrivacyLedger(accountant=dp.accountant) if dp else None)
        return GroupJob(client, strategy.downlink(self.state, client),
                        self.fed.data.shard(int(client)), options)

    def per_client(self) -> list[TrainResult]:
        return [self.trainer.train(j.client_id, j.start, j.data, **j.options)
                for j in map(self.job, self.clients)]

    def batched(self) -> list[TrainResult]:
        results = GroupTrainer(self.trainer).train([self.job(c) for c in self.clients])
        for r in results:
            if not isinstance(r, TrainResult):
                raise SystemExit(f"a client of the group failed: {r}")
        return results  # type: ignore[return-value]

    def timed(self, engine: str) -> tuple[float, list[TrainResult]]:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        results = getattr(self, engine.replace("-", "_"))()
        sync()
        return time.perf_counter() - start, results


def largest_difference(a: list[TrainResult], b: list[TrainResult]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        tx, ty = x.adapter.tensors(), y.adapter.tensors()
        worst = max([worst, *(float((tx[k] - ty[k]).abs().max()) for k in tx)])
    return worst


def measure(clients: int, local_steps: int, dp: bool, device: str, repeats: int) -> dict:
    job = Round(clients, local_steps, dp, device)
    cuda = job.device.type == "cuda"
    seconds: dict[str, list[float]] = {"per-client": [], "batched": []}
    peak: dict[str, float] = {}
    outputs: dict[str, list[TrainResult]] = {}
    for engine in seconds:  # warm-up: kernels, allocator, caches
        job.timed(engine)
    for _ in range(repeats):
        for engine in seconds:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            took, outputs[engine] = job.timed(engine)
            seconds[engine].append(took)
            if cuda:
                peak[engine] = torch.cuda.max_memory_allocated() / 2**20
    out: dict = {}
    for engine, runs in seconds.items():
        out[engine] = {"seconds_all_runs": runs, "seconds": statistics.median(runs),
                       "client_rounds_per_second": clients / statistics.median(runs)}
        if cuda:
            out[engine]["peak_cuda_mb"] = peak[engine]
    out["speedup"] = out["per-client"]["seconds"] / out["batched"]["seconds"]
    if not dp:
        out["largest_adapter_difference"] = largest_difference(outputs["per-client"],
                                                               outputs["batched"])
    return out


def device_facts(device: str) -> dict:
    if device == "cuda":
        return {"name": torch.cuda.get_device_name(), "torch": torch.__version__}
    return {"name": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", default="cpu,cuda",
                        help="the devices to measure, of those present")
    args = parser.parse_args()
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = json.loads(RESULTS.read_text())["results"] if RESULTS.is_file() else {}
    for device in (d for d in args.devices.split(",") if d in present):
        cases = {("dp" if dp else "no_dp"): measure(args.clients, args.local_steps, dp, device,
                                                    args.repeats) for dp in (False, True)}
        results[device] = {"device": device_facts(device), "clients": args.clients,
                           "local_steps": args.local_steps, "repeats": args.repeats, **cases}
        if device == "cuda":
            results[device]["target_speedup"] = TARGET_CUDA_SPEEDUP
        print(device, json.dumps(cases, indent=2), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "engines", "job": JOB, "results": results},
                                  indent=2) + "\n")
    for device, entry in results.items():
        print(f"{device}: batched {entry['no_dp']['speedup']:.2f}x per-client without DP, "
              f"{entry['dp']['speedup']:.2f}x with DP-SGD ({entry['clients']} clients)")


if __name__ == "__main__":
    main()
