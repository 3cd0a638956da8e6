"""Batched evaluation (dfml.evaluation.batched) against the per-episode path, on real Omniglot episodes.

The threaded path must give every episode exactly the per-episode path's result at one thread (what a
pipeline job runs); the stacked (vmapped) path is a different float program, so it is checked in float64,
where rounding cannot flip a prediction, for equal predictions on every query.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dfml.data import DatasetStore
from dfml.data.sources import prepare_dataset
from dfml.evaluation.batched import resolve_mode, score_episodes, stack_episodes
from dfml.evaluation.episodes import build_episode_set
from dfml.evaluation.icfil import ICFILSettings
from dfml.evaluation.icfil_scoring import icfil_grid_scorer, icfil_scorer
from dfml.evaluation.scoring import episode_accuracies, learner_scorer
from dfml.meta import build_learner
from dfml.models import build_model

from conftest import shared_omniglot_root

WAY = 5
ICFIL = ICFILSettings(n_hat=2, inv_steps=4, cal_steps=2)


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    out = tmp_path_factory.mktemp("omniglot")
    prepare_dataset("omniglot", out, root=shared_omniglot_root(), download=False, image_size=28)
    return DatasetStore(out)


def episode_set(store, shot, n=6, query=5, seed=11):
    return build_episode_set(store, "meta_test", way=WAY, shot=shot, query=query, n_episodes=n, seed=seed,
                             image_size=28, channels=1)


def meta_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = build_model("conv4", WAY, 1, 28, width=16, batch_stats_only=True).to(dtype)
    return model, {name: w.detach() for name, w in model.named_parameters()}


def learner(name, steps=3):
    return build_learner(name) if name == "protonet" else build_learner(name, inner_lr=0.1, test_steps=steps)


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def per_episode_at_one_thread(scorer, episodes):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return episode_accuracies(scorer, episodes, batched=False)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name,shot", [("maml", 1), ("maml", 5), ("anil", 5), ("protonet", 1)])
def test_threaded_plain_scores_equal_the_per_episode_path_bit_for_bit(omniglot, two_threads, name, shot):
    model, params = meta_model()
    scorer = learner_scorer(learner(name), model, params)
    episodes = episode_set(omniglot, shot)
    reference = per_episode_at_one_thread(scorer, episodes)
    threaded = episode_accuracies(scorer, episodes, batched="threads")
    assert threaded == reference
    assert len(set(reference)) > 1  # a real spread of accuracies, not a constant that any path would match
    assert score_episodes(scorer, episodes, batched="threads", chunk=1) == reference  # chunking keeps the order


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_threaded_icfil_scores_and_grids_equal_the_per_episode_path_bit_for_bit(omniglot, two_threads, name):
    model, params = meta_model()
    episodes = episode_set(omniglot, 1, n=4)
    single = icfil_scorer(learner(name, steps=1), model, params, ICFIL, seed=7, steps=1)
    assert episode_accuracies(single, episodes, batched="threads") == per_episode_at_one_thread(single, episodes)
    grid = [ICFIL, ICFILSettings(**{**vars(ICFIL), "tau": 0.5, "cal_steps": 1})]
    sweep = icfil_grid_scorer(learner(name, steps=1), model, params, grid, seed=7, steps=1)
    threaded = score_episodes(sweep, episodes, batched="threads")
    assert threaded == per_episode_at_one_thread(sweep, episodes)
    assert all(len(point) == 2 for point in threaded)


def test_scoring_never_writes_into_the_model_or_its_parameters(omniglot, two_threads):
    model, params = meta_model()
    before = {name: w.clone() for name, w in model.state_dict().items()}
    episodes = episode_set(omniglot, 1, n=4)
    for scorer in (learner_scorer(learner("maml"), model, params), icfil_scorer(learner("maml", 1), model, params, ICFIL)):
        score_episodes(scorer, episodes, batched="threads")
    assert all(torch.equal(before[name], w) for name, w in model.state_dict().items())
    assert not any(module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize("name,steps", [("maml", 1), ("maml", 5), ("protonet", 0)])
def test_stacked_plain_predicts_every_query_like_the_per_episode_path_in_float64(omniglot, name, steps):
    model, params = meta_model(dtype=torch.float64)
    scorer = learner_scorer(learner(name, steps), model, params, steps=steps)
    episodes = [e for e in episode_set(omniglot, 5, n=5).episodes()]
    episodes = [type(e)(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y) for e in episodes]
    stacked = scorer.stacked_predictions(stack_episodes(episodes))
    reference = torch.stack([scorer.predictions(e) for e in episodes])
    assert torch.equal(stacked, reference)
    assert scorer.stacked(stack_episodes(episodes)) == [scorer(e) for e in episodes]


def test_stacked_plain_in_float32_agrees_with_the_per_episode_path_within_rounding(omniglot):
    model, params = meta_model()
    scorer = learner_scorer(learner("maml", 1), model, params, steps=1)
    episodes = episode_set(omniglot, 5, n=5)
    stacked = score_episodes(scorer, episodes, batched="stacked", chunk=3)
    reference = episode_accuracies(scorer, episodes, batched=False)
    assert stacked == pytest.approx(reference, abs=2 / 75 + 1e-6)  # at most 2 near-tied queries of 75 flip


def test_auto_picks_threads_on_cpu_and_bad_modes_are_refused_by_name():
    model, params = meta_model()
    plain = learner_scorer(learner("maml"), model, params)
    icfil = icfil_scorer(learner("maml", 1), model, params, ICFIL)
    assert resolve_mode("auto", plain, "cpu") == "threads"
    assert resolve_mode(True, plain, "cpu") == "threads"
    assert resolve_mode(False, plain, "cpu") == "loop"
    assert resolve_mode("auto", plain, "cuda") == "stacked"
    assert resolve_mode("auto", icfil, "cuda") == "stacked"
    with pytest.raises(ValueError, match=r"batched must be True, False or one of .*'vmap'"):
        resolve_mode("vmap", plain, "cpu")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        score_episodes(plain, None, chunk=0)


def double_episodes(episode_set):
    return [type(e)(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y) for e in episode_set.episodes()]


@pytest.mark.parametrize("name", ["maml", "anil", "protonet"])
def test_stacked_icfil_predicts_every_query_like_the_per_episode_path_in_float64(omniglot, name):
    model, params = meta_model(dtype=torch.float64)
    grid = [ICFIL, ICFILSettings(**{**vars(ICFIL), "tau": 0.5, "cal_steps": 1}),
            ICFILSettings(**{**vars(ICFIL), "inv_steps": 2})]
    sweep = icfil_grid_scorer(learner(name, steps=2), model, params, grid, seed=5, steps=2)
    episodes = double_episodes(episode_set(omniglot, 2, n=4))
    stacked = sweep.stacked_predictions(stack_episodes(episodes))
    for index, episode in enumerate(episodes):
        for setting, reference in enumerate(sweep.grid_predictions(episode)):
            assert torch.equal(stacked[setting][index], reference), (index, setting)
    assert sweep.stacked(stack_episodes(episodes)) == [sweep(e) for e in episodes]


def test_batched_jitter_rolls_each_episode_like_the_per_episode_jitter():
    from dfml.evaluation.icfil_stacked import batched_jitter
    from dfml.inversion.losses import jitter

    images = torch.randn(3, 4, 2, 7, 9)
    seeds = [1, 2, 3]
    batched = batched_jitter(images, 3, [torch.Generator().manual_seed(s) for s in seeds])
    for e, s in enumerate(seeds):
        assert torch.equal(batched[e], jitter(images[e], 3, torch.Generator().manual_seed(s)))
    assert not torch.equal(batched[0], images[0]) or not torch.equal(batched[1], images[1])


def test_head_calibration_has_no_stacked_path_and_takes_the_loop():
    model, params = meta_model()
    scorer = icfil_scorer(learner("maml", 1), model, params, ICFILSettings(head_steps=2))
    assert resolve_mode("auto", scorer, "cuda") == "loop"
    with pytest.raises(ValueError, match="no stacked path for its settings"):
        resolve_mode("stacked", scorer, "cpu")


def test_cuda_graphs_are_used_only_for_cuda_tensors():
    from dfml.evaluation.batched import CudaGraphed

    calls = []
    graphed = CudaGraphed(lambda x: calls.append(x.shape) or x * 2)
    assert torch.equal(graphed(torch.ones(3)), torch.full((3,), 2.0))
    assert calls == [torch.Size([3])] and graphed.graphs == {}  # CPU: called eagerly, nothing captured


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh runs these)")


@cuda
@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_cuda_graphed_stacked_plain_predicts_like_eager_and_like_the_cpu_in_float64(omniglot, monkeypatch, name):
    model, params = meta_model(dtype=torch.float64)
    episodes = double_episodes(episode_set(omniglot, 5, n=6))
    reference = torch.stack([learner_scorer(learner(name, 2), model, params, steps=2).predictions(e)
                             for e in episodes])
    gpu_model = copy.deepcopy(model).to("cuda")
    gpu_params = {k: v.detach() for k, v in gpu_model.named_parameters()}
    scorer = learner_scorer(learner(name, 2), gpu_model, gpu_params, steps=2)
    batch = stack_episodes([e.to("cuda") for e in episodes])
    graphed = [scorer.stacked_predictions(batch) for _ in range(3)]  # capture, then replays
    assert len(scorer._graphed[batch.n_way].graphs) == 1
    monkeypatch.setenv("DFML_CUDA_GRAPHS", "0")
    eager = scorer.stacked_predictions(batch)
    assert all(torch.equal(g, eager) for g in graphed)
    assert torch.equal(eager.cpu(), reference)


@cuda
def test_cuda_stacked_icfil_predicts_like_the_cpu_per_episode_path_in_float64(omniglot):
    model, params = meta_model(dtype=torch.float64)
    episodes = double_episodes(episode_set(omniglot, 2, n=4))
    reference = icfil_grid_scorer(learner("maml", 1), model, params, [ICFIL], seed=5, steps=1)
    gpu_model = copy.deepcopy(model).to("cuda")
    gpu_params = {k: v.detach() for k, v in gpu_model.named_parameters()}
    sweep = icfil_grid_scorer(learner("maml", 1), gpu_model, gpu_params, [ICFIL], seed=5, steps=1)
    stacked = sweep.stacked_predictions(stack_episodes([e.to("cuda") for e in episodes]))[0].cpu()
    assert torch.equal(stacked, torch.stack([reference.grid_predictions(e)[0] for e in episodes]))
