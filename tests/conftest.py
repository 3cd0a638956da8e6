"""Shared test helpers, and the ``workflow`` marker of the tests under tests/workflow/.

The tests mirror the package: tests/methods/ (one file per method, the shared loop, tiny jobs), tests/inversion/,
tests/meta/, tests/data/, tests/models/, tests/studies/, tests/workflow/ (Snakemake, DVC, SLURM); the rest at the
top level (configuration, pool, report, docs). Tests import these helpers by name (``from conftest import
REPO_ROOT``: pytest puts tests/ on ``sys.path``); a folder's own helpers are a plain module beside its tests
(tests/methods/tiny_jobs.py). Test file names are unique across folders (no ``__init__.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see dfml/__init__.py
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_TESTS = Path(__file__).resolve().parent / "workflow"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/workflow/ runs Snakemake, DVC or SLURM: it gets the ``workflow`` marker, which
    `make test-fast` leaves out (``-m "not slow and not workflow"``) with the ``slow`` ones."""
    for item in items:
        if WORKFLOW_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.workflow)


def shared_dir() -> Path:
    """The shared folder (real data such as Omniglot): $DFML_SHARED, else <repo root>/../shared."""
    return Path(os.environ.get("DFML_SHARED", REPO_ROOT.parent / "shared"))


def shared_omniglot_root() -> Path:
    """The shared Omniglot npz pair's folder; the calling test skips, saying where it looked, only when the
    pair is absent (CI has it)."""
    root = shared_dir() / "data" / "omniglot"
    if not (root / "images_background.npz").is_file():
        pytest.skip(f"shared Omniglot npz pair not found in {root} (set DFML_SHARED)")
    return root


def shared_cifar100_root() -> Path:
    """The shared CIFAR-100 npz's folder; the calling test skips only when the file is absent (CI has it)."""
    root = shared_dir() / "data" / "cifar100"
    if not (root / "cifar100_by_class.npz").is_file():
        pytest.skip(f"shared CIFAR-100 npz not found in {root} (set DFML_SHARED)")
    return root


@pytest.fixture
def single_thread():
    """Tiny-tensor tests run faster on one thread, and do not fight other processes for the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def params_for_own_methods() -> dict:
    """params.yaml without what names the default run's methods (its report comparisons and run_methods), for a
    test that defines methods of its own: a comparison or run_methods entry naming a method not defined is refused."""
    import yaml

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["report"] = {"comparisons": []}
    params.pop("run_methods")
    return params


def tiny_omniglot_params(seed: int, *, pretrain_epochs: int, iterations: int, eval_every: int,
                         checkpoint_every: int, val_episodes: int) -> dict:
    """params.yaml shrunk to one scenario ``tiny``: 2 width-8 Conv4 teachers on real Omniglot (28 px),
    1-shot 3-query pseudo tasks from 8 slots per class, a width-8 meta-model; every method it defines runs,
    unless a test names some."""
    params = params_for_own_methods()
    params.update({
        "seed": seed,
        "run_scenarios": ["tiny"],
        "datasets": {"omni": {"source": "omniglot",
                              "options": {"root": str(shared_dir() / "data" / "omniglot"), "image_size": 28}}},
        "models": {"conv4": {"arch": "conv4", "width": 8}},
        "scenarios": {"tiny": {"datasets": ["omni"], "architectures": ["conv4"], "members_per_dataset": 2,
                               "image_size": 28, "channels": 1}},
        "pretrain": {"epochs": pretrain_epochs, "batch_size": 32},
    })
    params["inversion"].update(warm_start_steps=3, slots_per_class=8)
    params["evaluation"] = {"query": 3, "protocols": {"test1": {"test_steps": 1}}}
    params["metatrain"].update(shots=[1], query=3, iterations=iterations, eval_every=eval_every,
                               checkpoint_every=checkpoint_every, val_episodes=val_episodes,
                               meta_model={"width": 8, "pooling": "flatten"})
    return params


PROJECT_FILES = ("Snakefile", "params.yaml", "workflow", "scripts", "tools", "dfml")


def copy_project(workdir: Path, params: dict | None = None) -> Path:
    """The workflow's files in ``workdir`` (dfml/ too: rules list its sources as inputs; tools/ for the tests of
    the stand-alone commands on a finished run), with ``params`` written as params.yaml when given."""
    import yaml

    for name in PROJECT_FILES:
        src = REPO_ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, workdir / name)
    if params is not None:
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    return workdir


def run_snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
    """A real `snakemake --cores 2 ...` in ``workdir`` on CPU; on failure the assertion shows its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DFML_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
