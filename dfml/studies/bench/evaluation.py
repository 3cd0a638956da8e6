"""Evaluation speed: batched evaluation against the per-episode path (``tools/benchmark.py --preset evaluation``).

One run, one device, the same episodes for both paths: a meta-test of a Conv4 meta-model (batch-statistics
BatchNorm, as every meta-model) on fixed 5-way episodes, 1- and 5-shot, plain adaptation (the protocol's
test steps) and ICFIL (params.yaml's settings). The two paths alternate chunk by chunk, so a load change on
the machine hits both alike. Per cell: seconds per episode on each path, their ratio, FLOPs per episode
(convolutions and GEMMs), the achieved rate against the matmul peak measured in the same run, and whether the
batched path's accuracies equal the per-episode path run at one thread (what a pipeline job runs).

On CPU, each cell also profiles a few episodes at one thread: the time in the convolution and GEMM kernels
(forward and backward) and, from it, the **ceiling** of any speed-up that keeps those kernels, the ones whose
rounding decides the results: the per-episode time over the kernels' time spread over every core, as if every
other op, Python and dispatch cost nothing. A faster path needs other kernels, and other kernels round
differently (near-tied queries flip: docs/performance.md).
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from dfml.data import DatasetStore, write_store
from dfml.evaluation.batched import score_episodes
from dfml.evaluation.episodes import build_episode_set
from dfml.evaluation.icfil import ICFILSettings
from dfml.evaluation.icfil_scoring import icfil_scorer
from dfml.evaluation.scoring import learner_scorer
from dfml.meta import build_learner
from dfml.models import build_model
from dfml.studies.bench.suite import _sync, _threads, count_flops, machine_info, matmul_peak, profile_shares

DEFAULT_ICFIL = {"n_hat": 3, "inv_steps": 6, "inv_lr": 0.25, "tv": 1.0e-4, "l2": 1.0e-5, "bn": 0.01, "jitter": 2,
                 "tau": 0.1, "cal_steps": 5, "cal_lr": 0.01}  # params.yaml metatest.icfil


@dataclass
class EvalBenchOptions:
    device: str = "cpu"
    episodes: int = 600
    shots: tuple[int, ...] = (1, 5)
    calibrations: tuple[str, ...] = ("plain", "icfil")
    way: int = 5
    query: int = 15
    image_size: int = 28
    channels: int = 1
    width: int = 32
    learner: str = "maml"
    test_steps: int = 1
    icfil: dict = field(default_factory=lambda: dict(DEFAULT_ICFIL))
    chunk: int = 50  # episodes per alternation between the two paths
    threads: int | None = None  # None: one per core
    check_episodes: int = 20  # episodes re-run at one thread to check bit-equality
    profile_episodes: int = 10  # episodes profiled at one thread for the kernels' time (CPU)
    out: Path = Path("results/benchmark/evaluation")
    seed: int = 0

    @classmethod
    def quick_options(cls, **overrides) -> "EvalBenchOptions":
        base = dict(episodes=8, chunk=4, check_episodes=4, profile_episodes=2, width=8, image_size=16,
                    icfil={**DEFAULT_ICFIL, "inv_steps": 2, "cal_steps": 1})
        return cls(**{**base, **overrides})


def synthetic_store(root: Path, options: EvalBenchOptions, n_classes: int = 20) -> DatasetStore:
    """Random images in the canonical store format, enough for any shot; the episodes come from meta_test
    (one class each in meta_train and meta_val: a store needs every split)."""
    generator = torch.Generator().manual_seed(options.seed)
    per_class = max(options.shots) + options.query
    size, channels = options.image_size, options.channels
    images = {f"c{i:03d}": torch.randint(0, 256, (per_class, channels, size, size), generator=generator,
                                         dtype=torch.uint8) for i in range(n_classes + 2)}
    names = sorted(images)
    splits = {"meta_train": names[:1], "meta_val": names[1:2], "meta_test": names[2:]}
    write_store(root, "bench", images, splits, source="benchmark", mean=[0.5] * channels, std=[0.25] * channels)
    return DatasetStore(root)


def _scorer(calibration: str, options: EvalBenchOptions, model: torch.nn.Module):
    params = {name: w.detach() for name, w in model.named_parameters()}
    learner = build_learner(options.learner, inner_lr=0.01, test_steps=options.test_steps)
    if calibration == "plain":
        return learner_scorer(learner, model, params, steps=options.test_steps)
    return icfil_scorer(learner, model, params, ICFILSettings(**options.icfil), seed=options.seed,
                        steps=options.test_steps)


def _timed(fn: Callable[[], list], device: torch.device) -> tuple[list, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def measure_cell(store: DatasetStore, shot: int, calibration: str, options: EvalBenchOptions,
                 peak_gflops: float) -> dict:
    """Per-episode path vs batched path on the same episodes, alternating chunk by chunk."""
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    model = build_model("conv4", options.way, options.channels, options.image_size, width=options.width,
                        batch_stats_only=True).to(device)
    scorer = _scorer(calibration, options, model)
    episodes = build_episode_set(store, "meta_test", way=options.way, shot=shot, query=options.query,
                                 n_episodes=options.episodes, seed=options.seed + shot,
                                 image_size=options.image_size, channels=options.channels)
    seconds = {"per_episode": 0.0, "batched": 0.0}
    results = {"per_episode": [], "batched": []}
    for start in range(0, len(episodes), options.chunk):
        chunk = replace(episodes, specs=episodes.specs[start:start + options.chunk])
        for path, batched in (("per_episode", False), ("batched", "auto")):
            out, wall = _timed(lambda: score_episodes(scorer, chunk, device, batched=batched), device)
            seconds[path] += wall
            results[path].extend(out)
    check = replace(episodes, specs=episodes.specs[:options.check_episodes])
    with _threads(1):
        one_thread = score_episodes(scorer, check, device, batched=False)
    first = next(episodes.episodes(device))
    flops = count_flops(lambda: scorer(first))
    n = len(episodes)
    cell = {"shot": shot, "calibration": calibration, "episodes": n, "gflop_per_episode": flops / 1e9}
    for path in seconds:
        cell[f"{path}_ms_per_episode"] = 1000 * seconds[path] / n
        cell[f"{path}_gflops"] = flops * n / seconds[path] / 1e9
        cell[f"{path}_peak_fraction"] = cell[f"{path}_gflops"] / peak_gflops
        cell[f"{path}_mean_accuracy"] = sum(results[path]) / n
    cell["speedup"] = seconds["per_episode"] / seconds["batched"]
    cell["batched_equals_one_thread_reference"] = results["batched"][:len(one_thread)] == one_thread
    if device.type == "cpu":
        cell.update(kernel_ceiling(scorer, episodes, options, flops, cell["per_episode_ms_per_episode"]))
    return cell


def kernel_ceiling(scorer, episodes, options: EvalBenchOptions, flops_per_episode: int, per_episode_ms: float) -> dict:
    """One-thread profile of a few episodes: milliseconds per episode in the convolution/GEMM kernels, and the
    speed-up over the per-episode path that no path keeping those kernels can pass (the module docstring)."""
    sample = list(itertools.islice(episodes.episodes(torch.device("cpu")), options.profile_episodes))
    shares = profile_shares(lambda: [scorer(episode) for episode in sample], flops_per_episode * len(sample))
    kernel_ms = 1000 * shares["wall_s_profiled"] * shares["share_gemm_conv"] / len(sample)
    cores = options.threads or torch.get_num_threads()
    return {"one_thread_ms_per_episode": 1000 * shares["wall_s_profiled"] / len(sample),
            "kernel_ms_per_episode_one_thread": kernel_ms, "kernel_share_one_thread": shares["share_gemm_conv"],
            "kernel_gflops_one_thread": shares["gemm_conv_gflops"],
            "ceiling_keeping_kernels": per_episode_ms / (kernel_ms / cores) if kernel_ms > 0 else None}


def run_evaluation_benchmark(options: EvalBenchOptions, log: Callable[[str], None] = print) -> dict:
    device = torch.device(options.device)
    threads = options.threads or torch.get_num_threads()
    with _threads(threads), tempfile.TemporaryDirectory() as tmp:
        peak = matmul_peak(device, n=2048)
        log(f"[benchmark] evaluation on {device}, {threads} thread(s): matmul peak {peak['gflops_max']:.1f} GFLOP/s")
        store = synthetic_store(Path(tmp) / "store", options)
        cells = []
        for shot in options.shots:
            for calibration in options.calibrations:
                cell = measure_cell(store, shot, calibration, options, peak["gflops_max"])
                log(f"[benchmark] {shot}-shot {calibration}: per-episode {cell['per_episode_ms_per_episode']:.1f} ms, "
                    f"batched {cell['batched_ms_per_episode']:.1f} ms per episode ({cell['speedup']:.2f}x; "
                    f"{100 * cell['batched_peak_fraction']:.1f}% of peak)")
                cells.append(cell)
    results = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
               "threads": threads, "peak": peak, "machine": machine_info(device), "cells": cells}
    write_evaluation_outputs(results, Path(options.out))
    return results


def evaluation_table(results: dict) -> str:
    rows = ["| shot | calibration | per-episode (ms) | batched (ms) | speed-up | per-episode % of peak | "
            "batched % of peak | GFLOP / episode | equal to 1-thread path | conv/GEMM ms, 1 thread (share) | "
            "ceiling keeping the kernels |", "|" + "---|" * 11]
    for c in results["cells"]:
        kernels, ceiling = "-", "-"
        if c.get("ceiling_keeping_kernels"):
            kernels = f"{c['kernel_ms_per_episode_one_thread']:.1f} ({100 * c['kernel_share_one_thread']:.0f}%)"
            ceiling = f"{c['ceiling_keeping_kernels']:.2f}x"
        rows.append(f"| {c['shot']} | {c['calibration']} | {c['per_episode_ms_per_episode']:.1f} | "
                    f"{c['batched_ms_per_episode']:.1f} | {c['speedup']:.2f}x | "
                    f"{100 * c['per_episode_peak_fraction']:.1f} | {100 * c['batched_peak_fraction']:.1f} | "
                    f"{c['gflop_per_episode']:.3f} | {'yes' if c['batched_equals_one_thread_reference'] else 'no'} | "
                    f"{kernels} | {ceiling} |")
    return "\n".join(rows) + "\n"


def write_evaluation_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(evaluation_table(results))
