"""Measurements of the benchmark: configurations, timing, FLOPs, matmul peak, memory, profile.

Every configuration (architecture x pool size) runs in a fresh subprocess by default, so its
peak RSS is its own (``python -m dfml.studies.bench.suite <json>`` is that child). Within one
configuration, the engine and the reference are timed interleaved (engine, reference, engine,
...) on the same device and threads, so load changes on a shared machine hit both alike.
"""

from __future__ import annotations

import dfml  # noqa: F401  (first: OMP_WAIT_POLICY=PASSIVE before torch starts its threads)

import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from dfml.studies.bench.reference import ReferencePurer
from dfml.device import pick_device
from dfml.inversion import InversionEngine, InversionWeights, PseudoDataset
from dfml.inversion.allocator import tune_cpu_allocator
from dfml.meta import MAML, meta_batch_loss
from dfml.methods.purer import PurerSettings, PurerTrainer, sample_pseudo_tasks
from dfml.models import build_model
from dfml.models.fusion import build_meta_model

GEMM_OPS = ("mkldnn_convolution", "convolution_backward", "aten::mm", "aten::addmm", "aten::bmm",
            "aten::_slow_conv2d", "aten::cudnn_convolution", "aten::_convolution_double_backward")
POOL_OPS = ("max_pool2d", "adaptive_max_pool2d")


# ----------------------------------------------------------------------------- options and sizes


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: PURER SS at CIFAR-FS resolution on 1 x 32 x 32 images (the glyph demo runs at 28 px),
    5-way, 20 pseudo slots per class, widths of params.yaml."""

    image_size: int = 32
    channels: int = 1
    width: int = 32  # conv4 teachers and meta-model
    resnet_width: int = 16  # params.yaml models.resnet18.width
    way: int = 5
    shot: int = 1
    query: int = 15
    slots: int = 20
    meta_batch: int = 4
    icfil_inv_steps: int = 20
    icfil_cal_steps: int = 5


QUICK_SIZES = Sizes(image_size=16, width=8, resnet_width=4, query=2, slots=4, meta_batch=2,
                    icfil_inv_steps=2, icfil_cal_steps=1)

# Named configurations (tools/benchmark.py --preset): a scenario's pool measured alone, as the main
# configuration (iteration, components, speed-up over the reference, fraction of peak, checks); no pool-size
# sweep, no ResNet-18 configuration. The other sizes keep their scale (full, or QUICK_SIZES with --quick).
PRESETS = {
    # params.yaml scenarios.cifarfs_ss: PURER's CIFAR-FS SS pool, 13 Conv4 teachers on 3 x 32 x 32 images
    "cifarfs": {"pool": 13, "channels": 3},
}


@dataclass
class BenchOptions:
    device: str = "cpu"
    pool_sizes: tuple[int, ...] = (5, 10, 20, 50, 100)
    repeats: int = 5
    quick: bool = False
    out: Path = Path("results/benchmark")
    threads: int | None = None  # torch intra-op threads; None: one per core
    shot: int = 1
    main_pool: int = 20  # the configuration whose components, paths, profile and checks are measured
    resnet_pool: int = 5
    isolate: bool = True  # one subprocess per configuration (own peak RSS)
    profile: bool = True
    seed: int = 0
    plot: bool = True
    sizes: Sizes = field(default_factory=Sizes)
    preset: str | None = None  # a PRESETS name; set by with_preset

    @classmethod
    def quick_options(cls, **overrides) -> "BenchOptions":
        base = dict(pool_sizes=(2, 3), repeats=1, quick=True, main_pool=2, resnet_pool=2, isolate=False,
                    profile=True, sizes=QUICK_SIZES, threads=1)
        return cls(**{**base, **overrides})

    def with_preset(self, name: str) -> "BenchOptions":
        """These options measuring the PRESETS pool ``name`` alone (resnet_pool 0: no ResNet-18 configuration)."""
        preset = PRESETS[name]
        return replace(self, preset=name, main_pool=preset["pool"], pool_sizes=(preset["pool"],), resnet_pool=0,
                       sizes=replace(self.sizes, channels=preset["channels"]))


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]

    def summary(self) -> dict:
        return {
            "wall_median_s": statistics.median(self.wall),
            "wall_min_s": min(self.wall),
            "wall_max_s": max(self.wall),
            "wall_iqr_s": _iqr(self.wall),
            "cpu_median_s": statistics.median(self.cpu),
            "repeats": len(self.wall),
        }


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                     warmup: int = 1) -> dict[str, Timing]:
    """Run the functions round-robin ``warmup + repeats`` times; wall and process-CPU seconds."""
    timings = {name: Timing([], []) for name in fns}
    for round_index in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if round_index >= warmup:
                timings[name].wall.append(time.perf_counter() - wall)
                timings[name].cpu.append(time.process_time() - cpu)
    return timings


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the aten ops ``fn`` dispatches (convolutions, GEMMs; torch.utils.flop_counter's
    formulas), all run on this thread. A bare dispatch mode: FlopCounterMode's module tracker
    breaks on the ``autograd.grad`` calls the engine makes inside its forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with _env(DFML_MEMBER_WORKERS="1", DFML_TASK_WORKERS="1"), Counter():  # worker threads escape the mode
        fn()
    return Counter.total


def matmul_peak(device: torch.device, n: int = 4096, repeats: int = 5) -> dict:
    """Measured float32 GEMM rate (n x n x n) on ``device`` with the current thread count."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {"n": n, "threads": torch.get_num_threads(), "gflops_max": max(rates),
            "gflops_median": statistics.median(rates), "gflops_all": rates}


# ----------------------------------------------------------------------------- setup


def make_teacher(arch: str, sizes: Sizes, seed: int, device: torch.device) -> torch.nn.Module:
    """A random-init teacher with distinct, non-trivial BN running statistics (cost does not depend on weights)."""
    torch.manual_seed(seed)
    width = sizes.width if arch == "conv4" else sizes.resnet_width
    model = build_model(arch, sizes.way, sizes.channels, sizes.image_size, width=width)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.to(device).eval()


@dataclass
class Setup:
    trainer: PurerTrainer
    reference: ReferencePurer
    engine: InversionEngine
    sizes: Sizes
    device: torch.device
    teachers: list[torch.nn.Module]


def build_setup(arch: str, pool: int, sizes: Sizes, device: torch.device, seed: int = 0,
                mode: str = "auto") -> Setup:
    teachers = [make_teacher(arch, sizes, seed * 1000 + m, device) for m in range(pool)]
    class_lists = [[f"c{m * sizes.way + k:05d}" for k in range(sizes.way)] for m in range(pool)]
    pseudo = PseudoDataset.for_pool(class_lists, (sizes.channels, sizes.image_size, sizes.image_size),
                                    shots=sizes.slots - sizes.query, queries=sizes.query, seed=seed, device=device)
    weights = InversionWeights()
    engine = InversionEngine(list(zip(teachers, class_lists)), pseudo, weights, mode=mode, device=device)
    meta = build_meta_model(teachers, "average" if arch == "conv4" else "random", way=sizes.way,
                            in_channels=sizes.channels, image_size=sizes.image_size, width=sizes.width,
                            seed=seed).to(device)
    settings = PurerSettings(way=sizes.way, shot=sizes.shot, query=sizes.query, meta_batch=sizes.meta_batch,
                             warmup=10**9, iterations=10**9)  # ECI never arms: the common, non-adversarial step
    learner = MAML(inner_lr=0.01, train_steps=1, test_steps=1)
    trainer = PurerTrainer(engine, pseudo, meta, learner, settings, seed=seed)
    reference = ReferencePurer([(t, pseudo.class_indices(c)) for t, c in zip(teachers, class_lists)],
                               pseudo.images, copy.deepcopy(meta), learner, settings, weights, seed=seed)
    return Setup(trainer, reference, engine, sizes, device, teachers)


# ----------------------------------------------------------------------------- correctness checks


def check_equal_to_reference(setup: Setup, float64_members: int = 3) -> dict:
    """Engine vs reference gradients from one state: inversion (float32 and float64) and meta-batch."""
    s, engine = setup.sizes, setup.engine
    images = setup.trainer.pseudo.images.detach().clone()
    result = {}

    def inversion_grads(engine_: InversionEngine, reference: ReferencePurer, x: torch.Tensor):
        e_images = x.clone().requires_grad_()
        e_total, _ = engine_.loss(e_images, torch.Generator().manual_seed(11))
        (e_grad,) = torch.autograd.grad(e_total, [e_images])
        r_images = x.clone().requires_grad_()
        r_total = reference.inversion_loss(r_images, torch.Generator().manual_seed(11))
        (r_grad,) = torch.autograd.grad(r_total, [r_images])
        scale = float(r_grad.abs().max())
        rel = (e_grad - r_grad).abs() / max(scale, 1e-30)
        e_value, r_value = float(e_total.detach()), float(r_total.detach())
        return {"loss_rel_diff": abs(e_value - r_value) / max(abs(r_value), 1e-30),
                "grad_max_rel_diff": float(rel.max()),
                "grad_fraction_above_1e-5": float((rel > 1e-5).double().mean())}

    result["inversion_float32"] = inversion_grads(engine, setup.reference, images)
    # float64 on copies of a few teachers: separates the algorithm from float32 rounding (max-pool
    # argmax flips on near-ties move isolated pixels' gradients, in the reference's own float32 too).
    members = [(copy.deepcopy(t).double(), engine.members[i].classes)
               for i, t in enumerate(setup.teachers[:float64_members])]
    classes = sorted({c for _, cs in members for c in cs})
    small = InversionEngine(members, classes, engine.weights, mode=engine.mode)
    index = {c: i for i, c in enumerate(engine.class_names)}
    rows = [index[c] for c in classes]
    reference64 = ReferencePurer([(m, [classes.index(c) for c in cs]) for m, cs in members], images[rows].double(),
                                 copy.deepcopy(setup.reference.model), setup.reference.learner,
                                 setup.reference.settings, engine.weights)
    result["inversion_float64"] = inversion_grads(small, reference64, images[rows].double())
    result["inversion_path"] = engine.path(setup.device)

    # meta-batch: the project's meta_batch_loss (auto path) vs the per-task loop
    tasks = sample_pseudo_tasks(images, s.meta_batch, s.way, s.shot, s.query, torch.Generator().manual_seed(5))
    trainer = setup.trainer
    loss, _ = meta_batch_loss(trainer.learner, trainer.model, trainer.params, tasks, training=True)
    grads = torch.autograd.grad(loss, list(trainer.params.values()))
    ref_loss = torch.stack([trainer.learner.task_loss(trainer.model, trainer.params, t, training=True)[0]
                            for t in tasks]).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(trainer.params.values()))
    scale = max(float(b.abs().max()) for b in ref_grads)  # conv biases before BN have ~0 gradients: global scale
    result["meta_batch"] = {
        "loss_rel_diff": abs(float(loss.detach() - ref_loss.detach())) / max(abs(float(ref_loss.detach())), 1e-30),
        "grad_max_rel_diff": max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads)) / max(scale, 1e-30),
        "path": _meta_path(trainer, tasks),
    }
    return result


def _meta_path(trainer: PurerTrainer, tasks) -> str:
    from dfml.meta.batched import _threaded_tasks_apply

    if any(p.is_cuda for p in trainer.params.values()):
        return "vmap"
    return "threads" if _threaded_tasks_apply(trainer.model, trainer.params, tasks) else "loop"


# ----------------------------------------------------------------------------- profile


def profile_shares(fn: Callable[[], object], flops: int, repeats: int = 2) -> dict:
    """Single-thread torch.profiler attribution of ``fn``: GEMM/conv kernels, pooling, other ops,
    and the rest of the wall time (Python, dispatch, autograd bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    with _threads(1), _env(DFML_MEMBER_WORKERS="1", DFML_TASK_WORKERS="1"):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            wall = (time.perf_counter() - start) / repeats
    gemm = pool = other = 0.0
    top = []
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        seconds = event.self_cpu_time_total / 1e6 / repeats
        if any(op in event.key for op in GEMM_OPS):
            gemm += seconds
        elif any(op in event.key for op in POOL_OPS):
            pool += seconds
        else:
            other += seconds
        top.append((seconds, event.key))
    top.sort(reverse=True)
    overhead = max(wall - gemm - pool - other, 0.0)
    return {
        "wall_s_profiled": wall,
        "share_gemm_conv": gemm / wall,
        "share_pooling": pool / wall,
        "share_other_ops": other / wall,
        "share_overhead": overhead / wall,
        "gemm_conv_gflops": flops / gemm / 1e9 if gemm > 0 else None,
        "top_ops": [{"op": key, "ms": seconds * 1e3} for seconds, key in top[:8]],
    }


# ----------------------------------------------------------------------------- one configuration


def run_configuration(config: dict, options: BenchOptions) -> dict:
    """Measure one (arch, pool) configuration; ``config["role"]`` picks what to measure."""
    device = pick_device(options.device)
    sizes = replace(options.sizes, shot=options.shot)
    if options.threads:
        torch.set_num_threads(options.threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    arch, pool, role = config["arch"], config["pool"], config["role"]
    rss_start = _peak_rss_bytes()
    load_start = _load()
    peak_n = 512 if options.quick else 2048
    result_peak = matmul_peak(device, peak_n, repeats=3)  # under this configuration's load
    setup = build_setup(arch, pool, sizes, device, options.seed)
    trainer, reference = setup.trainer, setup.reference
    result = {"arch": arch, "pool": pool, "role": role, "inversion_path": setup.engine.path(device),
              "fused_members": len(setup.engine.fused_member_ids()), "threads": torch.get_num_threads(),
              "images_per_member": sizes.way * sizes.slots, "matmul_peak": result_peak}
    # engine alone first: the process peak after it is the engine's peak memory
    trainer.step()
    result["peak_rss_engine_bytes"] = _peak_rss_bytes()
    reference.step()
    repeats = options.repeats
    timings = time_interleaved({"engine": trainer.step, "reference": reference.step}, repeats, device)
    result["iteration"] = _pair_summary(timings)
    flops_ref = count_flops(reference.step)
    flops_engine = count_flops(trainer.step)
    result["iteration"]["gflop_reference"] = flops_ref / 1e9
    result["iteration"]["gflop_engine"] = flops_engine / 1e9
    if role == "main":
        components = {
            "inversion": {"engine": lambda: trainer.pseudo_data_step(), "reference": reference.pseudo_data_step},
            "maml": {"engine": trainer.meta_step, "reference": reference.meta_step},
        }
        for name, fns in components.items():
            result[name] = _pair_summary(time_interleaved(fns, repeats, device))
            result[name]["gflop_reference"] = count_flops(fns["reference"]) / 1e9
        result["icfil_episode"] = _icfil_component(setup, repeats)
        result["paths"] = _paths_component(setup, max(1, min(repeats, 3)))
        result["checks"] = check_equal_to_reference(setup)
        if options.profile and device.type == "cpu":
            with _threads(1):
                result["matmul_peak_1thread"] = matmul_peak(device, peak_n, repeats=3)
            result["profile_engine"] = profile_shares(trainer.step, flops_engine)
            result["profile_reference"] = profile_shares(reference.step, flops_ref)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["rss_at_start_bytes"] = rss_start
    result["load_start"], result["load_end"] = load_start, _load()
    if device.type == "cuda":
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def _pair_summary(timings: dict[str, Timing]) -> dict:
    engine, ref = timings["engine"].summary(), timings["reference"].summary()
    ratios = [r / e for r, e in zip(timings["reference"].wall, timings["engine"].wall)]
    return {"engine": engine, "reference": ref,
            "speedup_median": ref["wall_median_s"] / engine["wall_median_s"],
            "speedup_best": ref["wall_min_s"] / engine["wall_min_s"],  # fastest of each: least disturbed by load
            "speedup_min": min(ratios), "speedup_max": max(ratios),
            "speedup_cpu": ref["cpu_median_s"] / engine["cpu_median_s"]}


def _icfil_component(setup: Setup, repeats: int) -> dict:
    """One ICFIL test episode (adaptation + inversion steps + calibration steps + query prediction)."""
    from dfml.evaluation.icfil import ICFILSettings, icfil_adapt, icfil_query_logits

    s, trainer = setup.sizes, setup.trainer
    settings = ICFILSettings(inv_steps=s.icfil_inv_steps, cal_steps=s.icfil_cal_steps)
    task = sample_pseudo_tasks(trainer.pseudo.images.detach(), 1, s.way, s.shot, s.query,
                               torch.Generator().manual_seed(3))[0]

    def episode():
        out = icfil_adapt(trainer.learner, trainer.model, trainer.params, task.support_x, task.support_y, settings)
        return icfil_query_logits(trainer.learner, trainer.model, out.params, task.support_x, task.support_y,
                                  task.query_x)

    timing = time_interleaved({"engine": episode}, repeats, setup.device)["engine"].summary()
    timing["gflop"] = count_flops(episode) / 1e9
    timing["inv_steps"], timing["cal_steps"] = settings.inv_steps, settings.cal_steps
    return timing


def _paths_component(setup: Setup, repeats: int) -> dict:
    """Every inversion path and both meta-batch paths on this device: is "auto" the fastest?"""
    engine, trainer, device = setup.engine, setup.trainer, setup.device
    images = trainer.pseudo.images
    engines = {mode: InversionEngine([(m.model, m.classes) for m in engine.members], engine.class_names,
                                     engine.weights, mode=mode) for mode in ("fused", "batched", "sequential")}

    def inversion(eng: InversionEngine):
        def run():
            total, _ = eng.loss(images, torch.Generator().manual_seed(1))
            torch.autograd.grad(total, [images])
        return run

    fns = {f"inversion_{mode}": inversion(eng) for mode, eng in engines.items()}
    s = setup.sizes
    tasks = sample_pseudo_tasks(images.detach(), s.meta_batch, s.way, s.shot, s.query,
                                torch.Generator().manual_seed(2))
    for name, batched in (("loop", False), ("vmap", True), ("auto", "auto")):
        def meta(batched=batched):
            loss, _ = meta_batch_loss(trainer.learner, trainer.model, trainer.params, tasks, training=True,
                                      batched=batched)
            torch.autograd.grad(loss, list(trainer.params.values()))
        fns[f"maml_{name}"] = meta
    timings = time_interleaved(fns, repeats, device)
    out = {name: t.summary() for name, t in timings.items()}
    out["auto_inversion_path"] = engine.path(device)
    out["auto_meta_path"] = _meta_path(trainer, tasks)
    return out


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


# ----------------------------------------------------------------------------- whole benchmark


def plan(options: BenchOptions) -> list[dict]:
    configs = [{"arch": "conv4", "pool": options.main_pool, "role": "main"}]
    configs += [{"arch": "conv4", "pool": n, "role": "scaling"} for n in options.pool_sizes if n != options.main_pool]
    if options.resnet_pool:
        configs.append({"arch": "resnet18", "pool": options.resnet_pool, "role": "architecture"})
    return configs


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "malloc_tuned": tune_cpu_allocator(),
            "memory_total_bytes": _memory_total(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(options: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Run every configuration, write JSON / CSV / PNG under ``options.out``; returns the results."""
    from dfml.studies.bench.report import write_outputs

    device = pick_device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    tune_cpu_allocator()
    started = time.time()
    recorded = _jsonable(asdict(options))
    if recorded["preset"] is None:
        del recorded["preset"]  # runs without a preset record what they always did
    results = {"options": recorded, "machine": machine_info(device), "load_before": _load()}
    peak_n = 512 if options.quick else 4096
    log(f"matmul peak ({peak_n}^3 sgemm, {torch.get_num_threads()} threads) ...")
    results["matmul_peak_start"] = matmul_peak(device, peak_n)
    if device.type == "cpu" and not options.quick:
        with _threads(1):
            results["matmul_peak_1thread"] = matmul_peak(device, 2048)
    configs = []
    for config in plan(options):
        log(f"{config['arch']} pool {config['pool']} ({config['role']}) ...")
        configs.append(_run_isolated(config, options) if options.isolate else run_configuration(config, options))
    results["configurations"] = configs
    results["matmul_peak_end"] = matmul_peak(device, peak_n)
    results["load_after"] = _load()
    results["seconds"] = time.time() - started
    write_outputs(results, options, log)
    return results


def _run_isolated(config: dict, options: BenchOptions) -> dict:
    payload = json.dumps({"config": config, "options": _jsonable(asdict(options))})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "dfml.studies.bench.suite", payload], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark configuration {config} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def options_from_json(data: dict) -> BenchOptions:
    data = dict(data)
    data["sizes"] = Sizes(**data["sizes"])
    data["pool_sizes"] = tuple(data["pool_sizes"])
    data["out"] = Path(data["out"])
    return BenchOptions(**data)


def _child_main(argv: list[str]) -> None:
    payload = json.loads(argv[0])
    options = options_from_json(payload["options"])
    tune_cpu_allocator()
    result = run_configuration(payload["config"], options)
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
