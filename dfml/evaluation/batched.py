"""Batched evaluation: a fixed episode set scored in chunks, one episode per core on CPU, stacked on CUDA.

Every number the project reports passes through here (meta-test, meta-val selection, ICFIL tuning). A
scorer is an object with ``scorer(episode) -> result`` (the per-episode path, the reference) and
``scorer.for_worker()`` (a copy with a private model, since ``functional_call`` and ICFIL's BatchNorm hooks
swap module attributes); it may add ``scorer.stacked(batch)`` (a :class:`~dfml.meta.TaskBatch` of identical
episodes -> one result each, vmapped), and ``scorer.can_stack`` when only some of its settings have that path.

``batched``:

* ``False`` / ``"loop"``: one episode after another in the calling thread (today's path);
* ``"threads"``: the episodes of a chunk spread over worker threads, each running ATen single-threaded
  (:func:`dfml.meta.batched.map_single_threaded`, as the training engine runs a meta-batch's tasks). Each
  episode computes exactly what the per-episode path computes at one thread (as a pipeline job runs), so
  its result is identical bit for bit; with one thread it *is* the per-episode loop. (At several threads
  the per-episode path itself rounds differently: MKL's split of a GEMM depends on the thread count.)
* ``"stacked"``: chunks stacked on a leading dim and vmapped (``scorer.stacked``): few large kernels instead
  of many small ones, for GPUs (on this project's CPU it measured slower than the loop); equal predictions,
  not equal bits (BatchNorm from primitives, other kernels). On CUDA, plain adaptation's chunk is one
  static-shape program, captured once in a CUDA graph and replayed (:class:`CudaGraphed`);
* ``"auto"`` (default): ``"threads"`` on CPU; on CUDA ``"stacked"`` when the scorer has it, else ``"loop"``.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
from tqdm import tqdm

from dfml.data.episodes import Episode
from dfml.meta.batched import map_single_threaded
from dfml.meta.tasks import Task, TaskBatch, stack_tasks

Batched = bool | Literal["auto", "loop", "threads", "stacked"]
MODES = ("loop", "threads", "stacked")
DEFAULT_CHUNK = 64  # episodes materialised at once: bounds memory, keeps every worker busy


class EpisodeScorer(Protocol):
    def __call__(self, episode: Episode) -> Any: ...

    def for_worker(self) -> "EpisodeScorer": ...


def resolve_mode(batched: Batched, scorer: EpisodeScorer, device: torch.device | str) -> str:
    """The path ``batched`` asks for on ``device`` (see the module docstring)."""
    if batched is False or batched == "loop":
        return "loop"
    if batched is True or batched == "auto":
        if torch.device(device).type != "cuda":
            return "threads"
        return "stacked" if _can_stack(scorer) else "loop"  # CPU threads do not help a GPU
    if batched == "stacked" and not _can_stack(scorer):
        raise ValueError(f"{type(scorer).__name__} has no stacked path for its settings; use batched='threads' "
                         "or 'loop'")
    if batched in MODES:
        return batched
    raise ValueError(f"batched must be True, False or one of {['auto', *MODES]}, got {batched!r}")


def _can_stack(scorer: EpisodeScorer) -> bool:
    return hasattr(scorer, "stacked") and getattr(scorer, "can_stack", True)


def stack_episodes(episodes: Sequence[Episode]) -> TaskBatch:
    """Episodes of identical shapes as one :class:`TaskBatch` (what ``scorer.stacked`` takes)."""
    return stack_tasks([Task.from_episode(episode) for episode in episodes])


def score_episodes(scorer: EpisodeScorer, episode_set, device: torch.device | str = "cpu", *,
                   batched: Batched = "auto", chunk: int = DEFAULT_CHUNK, progress: bool = False,
                   desc: str = "episodes") -> list:
    """``[scorer(episode) for episode in episode_set]``, computed along the path ``batched`` selects."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 episode, got {chunk}")
    mode = resolve_mode(batched, scorer, device)
    run = {"loop": _loop, "threads": _ThreadedScorer(), "stacked": _stacked}[mode]
    specs, results = episode_set.specs, []
    with tqdm(total=len(specs), desc=desc, disable=not progress, mininterval=2.0) as bar:
        for start in range(0, len(specs), chunk):
            episodes = [episode_set.sampler.materialize(spec, device) for spec in specs[start:start + chunk]]
            results.extend(run(scorer, episodes))
            bar.update(len(episodes))
    return results


def _loop(scorer: EpisodeScorer, episodes: list[Episode]) -> list:
    return [scorer(episode) for episode in episodes]


def _stacked(scorer: EpisodeScorer, episodes: list[Episode]) -> list:
    return list(scorer.stacked(stack_episodes(episodes)))


class _ThreadedScorer:
    """Every episode single-threaded, one per worker thread; each worker keeps a private scorer across chunks."""

    def __init__(self):
        self._local = threading.local()

    def __call__(self, scorer: EpisodeScorer, episodes: list[Episode]) -> list:
        threads = torch.get_num_threads()
        if min(threads, len(episodes)) <= 1:  # one worker: the calling thread, at one thread as the workers
            torch.set_num_threads(1)
            try:
                return [scorer(episode) for episode in episodes]
            finally:
                torch.set_num_threads(threads)

        def run(episode: Episode):
            own = getattr(self._local, "scorer", None)
            if own is None:
                own = self._local.scorer = scorer.for_worker()
            return own(episode)

        return map_single_threaded(run, episodes)


class CudaGraphed:
    """``fn(*tensors) -> tensor`` captured in a CUDA graph per input signature (shapes, dtypes) and replayed.

    A stacked chunk is one static-shape program (every chunk but the last has the same shapes): captured once,
    each later chunk costs one graph launch instead of thousands of kernel launches. Inputs are copied into the
    graph's static buffers; the output is cloned out of its static buffer. ``fn`` must not synchronise with the
    host (no ``.item()``, no data-dependent shapes). ``DFML_CUDA_GRAPHS=0`` turns capture off (eager calls);
    on CPU tensors it always calls ``fn`` eagerly.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.graphs: dict[tuple, tuple] = {}

    @staticmethod
    def enabled(tensors: Sequence[torch.Tensor]) -> bool:
        return all(t.is_cuda for t in tensors) and os.environ.get("DFML_CUDA_GRAPHS", "1") != "0"

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if not self.enabled(tensors):
            return self.fn(*tensors)
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        if key not in self.graphs:
            self.graphs[key] = self._capture(tensors)
        graph, inputs, output = self.graphs[key]
        for buffer, tensor in zip(inputs, tensors):
            buffer.copy_(tensor)
        graph.replay()
        return output.clone()

    def _capture(self, tensors: Sequence[torch.Tensor]) -> tuple:
        inputs = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisations, autotuning
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*inputs)
        return graph, inputs, output
