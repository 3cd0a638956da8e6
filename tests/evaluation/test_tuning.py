"""Meta-val tuning (dfml/evaluation/tuning.py) and evaluation protocols (dfml/evaluation/protocol.py) on tiny inputs."""

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from dfml.config import ParamsError, check_params
from dfml.meta import MAML, ProtoNet
from dfml.evaluation.episodes import episode_means
from dfml.evaluation.protocol import evaluation_protocol, evaluation_protocols, make_learner
from dfml.evaluation.tuning import grid_points, rank_points


def test_grid_points_are_every_combination_with_sorted_keys():
    assert grid_points({"tau": [0.1, 0.5], "cal_steps": [1, 5]}) == [
        {"cal_steps": 1, "tau": 0.1}, {"cal_steps": 1, "tau": 0.5}, {"cal_steps": 5, "tau": 0.1},
        {"cal_steps": 5, "tau": 0.5}]


def test_episode_means_average_datasets_episode_by_episode():
    assert episode_means([[0.2, 0.4], [0.6, 1.0]]) == pytest.approx([0.4, 0.7])


def test_rank_points_keeps_every_point_with_its_paired_gap_and_says_when_the_choice_is_decisive():
    torch.manual_seed(0)
    base = torch.rand(40).tolist()
    points = [{"k": 1}, {"k": 2}, {"k": 3}]
    clear = rank_points(points, [base, [b + 0.2 for b in base], [b - 0.1 for b in base]])
    assert clear["settings"] == {"k": 2} and clear["decisive"]
    assert [round(r["gap_to_chosen"], 6) for r in clear["grid"]] == [0.2, 0.0, 0.3]
    assert len(clear["grid"]) == 3 and all({"mean", "ci95", "gap_ci95", "gap_p_value"} <= set(r) for r in clear["grid"])
    noisy = torch.rand(40).tolist()
    tie = rank_points(points[:2], [base, [b + 0.01 * (2 * n - 1) for b, n in zip(base, noisy)]])
    assert not tie["decisive"]  # a gap within noise is reported as such, not as a finding


def settings(protocols, query=15):
    return {"evaluation": {"query": query, "protocols": protocols}}


def test_protocols_are_read_in_name_order_with_the_shared_query():
    found = evaluation_protocols(settings({"test10": {"test_steps": 10}, "test1": {"test_steps": 1}}, query=5))
    assert [(p.name, p.test_steps, p.query) for p in found] == [("test1", 1, 5), ("test10", 10, 5)]
    with pytest.raises(ValueError, match="unknown evaluation protocol 'test5'; defined in evaluation.protocols"):
        evaluation_protocol(settings({"test1": {"test_steps": 1}}), "test5")


def test_make_learner_adapts_with_the_protocol_steps():
    mt = {"learner": "maml", "inner_lr": 0.1, "train_steps": 2}
    learner = make_learner(mt, 10)
    assert isinstance(learner, MAML) and learner.train_steps == 2 and learner.test_steps == 10
    assert isinstance(make_learner({**mt, "learner": "protonet"}, 3), ProtoNet)


@pytest.mark.parametrize("section,key,where", [("metatrain", "test_steps", "evaluation.protocols"),
                                               ("metatest", "test_steps", "evaluation.protocols"),
                                               ("metatest", "query", "evaluation.query")])
def test_old_evaluation_keys_are_refused_with_where_they_went(section, key, where):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params[section][key] = 1
    with pytest.raises(ParamsError, match=rf"{section}.{key} is no longer read: .*use {where}"):
        check_params(params)
