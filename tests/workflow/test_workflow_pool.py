"""Real Snakemake runs of the data + pool phases on a tiny Omniglot config in a temporary copy."""

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import copy_project, run_snakemake, shared_dir

pytestmark = pytest.mark.slow



def tiny_params(omniglot_root: Path) -> dict:
    return {
        "seed": 1,
        "run_scenarios": ["tiny"],
        "datasets": {"omni": {"source": "omniglot", "options": {"root": str(omniglot_root), "image_size": 28}}},
        "models": {"conv4": {"arch": "conv4", "width": 8}, "r10": {"arch": "resnet10", "width": 4}},
        "scenarios": {"tiny": {"datasets": ["omni"], "architectures": ["conv4", "r10"], "members_per_dataset": 2,
                               "image_size": 28, "channels": 1}},
        "pretrain": {"epochs": 2, "batch_size": 32},
    }




def job_counts(output: str) -> dict[str, int]:
    stats = output.split("Job stats:")[1] if "Job stats:" in output else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("project"), tiny_params(shared_dir() / "data" / "omniglot"))


@pytest.fixture(scope="module")
def built(project):
    dry = run_snakemake(project, "-n", "pool")
    run = run_snakemake(project, "pool")
    return project, dry, run


def test_dry_run_lists_one_pretrain_job_per_member(built):
    _, dry, _ = built
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["pretrain_model"] == 2
    assert counts["prepare_dataset"] == 1


def test_pool_is_built_with_cards_and_summary(built):
    project, _, _ = built
    pool = project / "results" / "pool" / "tiny"
    cards = [json.loads((pool / f"member_{i}.json").read_text()) for i in range(2)]
    assert [c["architecture"]["name"] for c in cards] == ["conv4", "resnet10"]
    assert all(c["dataset"] == "omni" and len(c["classes"]) == 5 for c in cards)
    assert all(0.0 <= c["heldout_accuracy"] <= 1.0 for c in cards)
    assert cards[0]["classes"] != cards[1]["classes"]
    summary = (pool / "summary.md").read_text()
    assert "heldout_accuracy" in summary and "2 members" in summary
    assert (project / "logs" / "pool" / "tiny" / "member_0.log").is_file()
    assert (project / "benchmarks" / "pool" / "tiny" / "member_1.tsv").is_file()


def test_rerun_does_nothing(built):
    project, _, _ = built
    proc = run_snakemake(project, "-n", "pool")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_params_change_reruns_only_affected_members(built):
    project, _, _ = built
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["resnet"] = {"optimizer": "sgd", "lr": 0.05}
    changed = project / "changed.yaml"
    changed.write_text(yaml.safe_dump(params))
    proc = run_snakemake(project, "-n", "pool", "--configfile", str(changed))
    output = proc.stdout + proc.stderr
    counts = job_counts(output)
    assert counts["pretrain_model"] == 1
    rebuilt = re.findall(r"output: results/pool/tiny/member_(\d+)\.safetensors", output)
    assert rebuilt == ["1"]  # only the resnet10 member depends on the changed optimizer settings


def test_invalid_params_value_fails_naming_the_key(built):
    project, _, _ = built
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["scenarios"]["tiny"]["members_per_dataset"] = 0
    bad = project / "bad.yaml"
    bad.write_text(yaml.safe_dump(params))
    proc = run_snakemake(project, "-n", "pool", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "members_per_dataset" in output and "minimum" in output
