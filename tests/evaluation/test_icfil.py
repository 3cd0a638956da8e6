"""ICFIL (dfml/evaluation/icfil.py, its scorer dfml/evaluation/icfil_scoring.py): the inversion, the contrastive
loss and the calibration; it never touches the meta-model; bad settings."""

import math

import pytest
import torch
import torch.nn.functional as F

from dfml.data.episodes import Episode
from dfml.evaluation.icfil import (ICFILSettings, calibrate_backbone, contrastive_calibration_loss,
                                   forward_with_bn_match, icfil_adapt, icfil_query_logits, support_bn_statistics)
from dfml.evaluation.icfil_scoring import icfil_grid_scorer, icfil_scorer
from dfml.evaluation.scoring import learner_scorer
from dfml.meta import backbone_features, build_learner
from dfml.models import build_model

WAY, SHOT, QUERY, SIZE = 3, 2, 3, 16
FAST = ICFILSettings(n_hat=2, inv_steps=12, cal_steps=2, cal_lr=0.05)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(seed=0):
    torch.manual_seed(seed)
    return build_model("conv4", WAY, 1, SIZE, width=8, batch_stats_only=True)


def make_episode(seed=0, noise=0.5):
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(WAY, 1, SIZE, SIZE, generator=generator)

    def images(per_class):
        labels = torch.arange(WAY).repeat_interleave(per_class)
        return patterns[labels] + noise * torch.randn(len(labels), 1, SIZE, SIZE, generator=generator), labels

    support_x, support_y = images(SHOT)
    query_x, query_y = images(QUERY)
    return Episode(support_x, support_y, query_x, query_y)


def make_learner(name):
    return build_learner(name) if name == "protonet" else build_learner(name, inner_lr=0.1, test_steps=2)


def meta_params(model):
    return dict(model.named_parameters())


def run_icfil(name="maml", settings=FAST, seed=0, model=None, episode=None):
    model = model or make_model()
    episode = episode or make_episode()
    result = icfil_adapt(make_learner(name), model, meta_params(model), episode.support_x, episode.support_y,
                         settings, seed)
    return model, episode, result


def test_calibration_changes_the_backbone_and_never_touches_the_meta_model():
    model = make_model()
    stored = {name: p.detach().clone() for name, p in model.named_parameters()}
    _, _, result = run_icfil("maml", model=model)
    backbone = [name for name in result.params if name.startswith("backbone.")]
    assert any(not torch.equal(result.params[name], result.adapted[name]) for name in backbone)
    assert all(torch.equal(result.params[name], result.adapted[name]) for name in result.params
               if name.startswith("head."))  # head_steps == 0
    for name, p in model.named_parameters():
        assert torch.equal(p, stored[name]), name
        assert p.grad is None, name
    assert result.calibration_loss_last < result.calibration_loss_first


def test_head_calibration_moves_only_when_asked():
    settings = ICFILSettings(n_hat=2, inv_steps=3, cal_steps=0, head_steps=2, head_lr=0.1)
    _, _, result = run_icfil("maml", settings=settings)
    assert not torch.equal(result.params["head.weight"], result.adapted["head.weight"])
    assert torch.equal(result.params["backbone.blocks.0.conv.weight"], result.adapted["backbone.blocks.0.conv.weight"])


@pytest.mark.parametrize("name", ["maml", "anil", "protonet"])
def test_without_calibration_icfil_predicts_exactly_like_plain_adaptation(name):
    settings = ICFILSettings(n_hat=2, inv_steps=3, cal_steps=0, head_steps=0)
    model, episode, result = run_icfil(name, settings=settings)
    learner, params = make_learner(name), meta_params(model)
    with torch.no_grad():
        adapted = learner.adapt(model, params, episode.support_x, episode.support_y,
                                steps=learner.test_steps, create_graph=False, n_way=WAY)
        plain = learner.query_logits(model, params, adapted, episode.query_x)
    icfil = icfil_query_logits(learner, model, result.params, episode.support_x, episode.support_y, episode.query_x)
    assert torch.equal(icfil, plain)
    assert icfil_scorer(learner, model, params, settings)(episode) == learner_scorer(learner, model, params)(episode)


def test_contrastive_loss_matches_a_hand_computation():
    real = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    real_y = torch.tensor([0, 1])
    pseudo = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0], [-1.0, 1.0]])
    pseudo_y = torch.tensor([0, 0, 1, 1])
    tau = 0.5

    def by_hand(normalise):
        def unit(v):
            norm = math.hypot(*v) if normalise else 1.0
            return [c / norm for c in v]
        z, z_hat = [unit(v) for v in real.tolist()], [unit(v) for v in pseudo.tolist()]
        terms = []
        for i, y in enumerate(real_y.tolist()):
            logits = [sum(a * b for a, b in zip(z[i], z_hat[j])) / tau for j in range(4)]
            log_denominator = math.log(sum(math.exp(s) for s in logits))
            terms += [log_denominator - logits[j] for j in range(4) if pseudo_y[j] == y]
        return sum(terms) / len(terms)  # 4 positive pairs

    for normalise in (True, False):
        loss = contrastive_calibration_loss(real, real_y, pseudo, pseudo_y, tau, feature_norm=normalise)
        assert float(loss) == pytest.approx(by_hand(normalise), rel=1e-6)


def mean_positive_similarity(real, real_y, pseudo, pseudo_y):
    similarity = F.normalize(real, dim=1) @ F.normalize(pseudo, dim=1).T
    return float(similarity[real_y.unsqueeze(1) == pseudo_y.unsqueeze(0)].mean())


def test_contrastive_gradient_pulls_same_class_pairs_together():
    generator = torch.Generator().manual_seed(3)
    real, pseudo = torch.randn(2, 5, generator=generator), torch.randn(4, 5, generator=generator)
    real_y, pseudo_y = torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1])
    real.requires_grad_()
    contrastive_calibration_loss(real, real_y, pseudo, pseudo_y, tau=0.1).backward()
    before = mean_positive_similarity(real.detach(), real_y, pseudo, pseudo_y)
    after = mean_positive_similarity(real.detach() - 0.1 * real.grad, real_y, pseudo, pseudo_y)
    assert after > before


def test_a_calibration_step_of_the_backbone_raises_positive_similarity():
    model, episode, result = run_icfil("maml")
    settings = ICFILSettings(n_hat=2, cal_steps=1, cal_lr=0.05)
    calibrated, first, last = calibrate_backbone(model, result.adapted, episode.support_x, episode.support_y,
                                                 result.pseudo_x, result.pseudo_y, settings)

    def similarity(weights):
        with torch.no_grad():
            return mean_positive_similarity(backbone_features(model, weights, episode.support_x), episode.support_y,
                                            backbone_features(model, weights, result.pseudo_x), result.pseudo_y)

    assert last < first
    assert similarity(calibrated) > similarity(result.adapted)


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_inversion_makes_the_adapted_model_classify_the_pseudo_data_as_their_labels(name):
    no_inversion = ICFILSettings(n_hat=2, inv_steps=0, cal_steps=0)
    inversion = ICFILSettings(n_hat=2, inv_steps=30, cal_steps=0)
    _, _, noise = run_icfil(name, settings=no_inversion)
    model, episode, inverted = run_icfil(name, settings=inversion)
    assert inverted.inversion_ce < 0.75 * noise.inversion_ce
    logits = icfil_query_logits(make_learner(name), model, inverted.adapted, episode.support_x, episode.support_y,
                                inverted.pseudo_x)
    assert float((logits.argmax(dim=1) == inverted.pseudo_y).float().mean()) >= 0.8


def test_bn_match_is_zero_for_the_support_batch_itself_and_hooks_are_removed():
    model, episode = make_model(), make_episode()
    weights = meta_params(model)
    targets = support_bn_statistics(model, weights, episode.support_x)
    assert len(targets) == 4  # one per conv4 block

    def features(images):
        return backbone_features(model, weights, images)

    _, same = forward_with_bn_match(features, model, episode.support_x, targets)
    _, other = forward_with_bn_match(features, model, episode.query_x, targets)
    assert float(same.detach()) == 0.0
    assert float(other.detach()) > 0.0
    assert all(not module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize("name", ["maml", "anil", "protonet"])
def test_scoring_an_episode_twice_gives_the_same_accuracy(name):
    model, episode = make_model(), make_episode()
    scorer = icfil_scorer(make_learner(name), model, meta_params(model), FAST, seed=7)
    first = scorer(episode)
    scorer(make_episode(seed=1))  # another episode in between must not matter
    assert scorer(episode) == first
    _, _, a = run_icfil(name, seed=7)
    _, _, b = run_icfil(name, seed=7)
    _, _, c = run_icfil(name, seed=8)
    assert all(torch.equal(a.params[key], b.params[key]) for key in a.params)
    assert not torch.equal(a.pseudo_x, c.pseudo_x)


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_a_calibration_sweep_scores_each_point_as_a_separate_run(name):
    from dataclasses import replace

    model, episode = make_model(), make_episode(noise=2.0)  # hard enough for the points to differ
    grid = [replace(FAST, tau=0.5), replace(FAST, cal_steps=1), replace(FAST, inv_steps=3), FAST]
    swept = icfil_grid_scorer(make_learner(name), model, meta_params(model), grid, seed=3)(episode)
    alone = [icfil_scorer(make_learner(name), model, meta_params(model), point, seed=3)(episode) for point in grid]
    assert swept == alone
    assert len(set(swept)) > 1  # the points really differ on this episode


@pytest.mark.parametrize("setting, value", [("tau", 0.0), ("tau", -0.1), ("n_hat", 0), ("n_hat", 1.5),
                                            ("inv_lr", 0.0), ("cal_steps", -1), ("bn", -1.0)])
def test_bad_settings_are_refused_by_name(setting, value):
    with pytest.raises(ValueError, match=setting):
        ICFILSettings(**{setting: value})


def test_a_train_mode_model_with_running_statistics_is_refused():
    torch.manual_seed(0)
    model = build_model("conv4", WAY, 1, SIZE, width=8, batch_stats_only=False).train()
    episode = make_episode()
    with pytest.raises(ValueError, match="running statistics"):
        icfil_adapt(make_learner("maml"), model, meta_params(model), episode.support_x, episode.support_y, FAST)
