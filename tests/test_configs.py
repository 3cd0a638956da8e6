"""The shipped override files (configs/*.yaml) stay valid against the params schema."""

import pytest

from conftest import REPO_ROOT
from dfml.config import ParamsError, load_params

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {path.name for path in CONFIGS} >= {"omniglot.yaml", "eci_study.yaml", "icfil_control.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_each_config_merges_over_params_and_validates(config):
    params = load_params(REPO_ROOT / "params.yaml", [config])
    assert set(params["run_scenarios"]) <= set(params["scenarios"])
    assert {"purer", "purer_ei"} <= set(params["methods"])


def test_a_misspelt_option_in_an_override_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  purer: {adversarial_stepp: separate}\n")
    with pytest.raises(ParamsError, match="adversarial_stepp"):
        load_params(REPO_ROOT / "params.yaml", [bad])
