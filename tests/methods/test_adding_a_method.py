"""Adding a method is four additions (docs/adding_a_method.md): the worked example's method file, its registry
line, its schema block and its params.yaml entry, taken from the page itself, are added to a copy of the project;
nothing else differs from the project, and the new method meta-trains through scripts/metatrain.py (the real
entry point: settings checked and filled, pool loaded, meta-val selection, cards, curve, checkpoint), then
resumes from its checkpoint."""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from conftest import REPO_ROOT, copy_project
from dfml.checkpoint import load_checkpoint
from dfml.data import write_store
from dfml.models import build_model
from dfml.pool import MemberSpec, member_paths, save_member
from dfml.report import method_order

PAGE = REPO_ROOT / "docs" / "adding_a_method.md"
SIZE, CLASSES = 16, 5


def page_blocks() -> dict[str, str]:
    """The worked example's code blocks: the module, the registry line, the schema block, the params entry."""
    blocks = re.findall(r"```(\w+)\n(.*?)```", PAGE.read_text(), re.S)
    found = {}
    for language, text in blocks:
        if text.startswith("# dfml/methods/noisekd.py\n"):
            found["module"] = text.split("\n", 1)[1]
        elif language == "python" and text.strip().startswith('"noisekd": ('):
            found["registry"] = text
        elif language == "yaml" and text.startswith("    noisekd:\n"):
            found["schema"] = text
        elif language == "yaml" and text.startswith("  noisekd: {algorithm: noisekd"):
            found["params"] = text
    assert sorted(found) == ["module", "params", "registry", "schema"], sorted(found)
    return found


def insert_before(path: Path, marker: str, text: str, after: str = "") -> None:
    """``text`` inserted before the first line equal to ``marker`` that follows the first line starting with
    ``after``."""
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    index = next(i for i, line in enumerate(lines) if i > start and line.rstrip("\n") == marker)
    path.write_text("".join(lines[:index]) + text + "".join(lines[index:]))


def add_the_method(project: Path) -> None:
    """The page's four additions, each where the page says."""
    blocks = page_blocks()
    (project / "dfml" / "methods" / "noisekd.py").write_text(blocks["module"])
    insert_before(project / "dfml" / "methods" / "base.py", "}", blocks["registry"], after="ALGORITHMS:")
    schema = project / "workflow" / "schemas" / "params.schema.yaml"
    definitions = yaml.safe_load(schema.read_text())["definitions"]
    after_algorithms = list(definitions)[list(definitions).index("algorithms") + 1]
    insert_before(schema, f"  {after_algorithms}:", blocks["schema"])  # the end of definitions.algorithms
    params = project / "params.yaml"
    lines = params.read_text().splitlines(keepends=True)
    index = lines.index("methods:\n") + 1
    params.write_text("".join(lines[:index]) + blocks["params"] + "".join(lines[index:]))


def project_files(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): path.read_text()
            for name in ("Snakefile", "params.yaml", "workflow", "scripts", "tools", "dfml")
            for path in ([root / name] if (root / name).is_file() else sorted((root / name).rglob("*")))
            if path.is_file() and "__pycache__" not in path.parts}


def inserted_lines(before: str, after: str) -> list[str]:
    """The lines ``after`` adds to ``before``, asserting that it only adds, in one place."""
    ops = [op for op in difflib.SequenceMatcher(a=before.splitlines(), b=after.splitlines(), autojunk=False)
           .get_opcodes() if op[0] != "equal"]
    assert len(ops) == 1 and ops[0][0] == "insert", ops
    return after.splitlines()[ops[0][3]:ops[0][4]]


def toy_data(project: Path) -> None:
    """A 16 x 16 store `toy` (10 meta-train, 5 meta-val, 5 meta-test classes) and a pool of two untrained Conv4
    members on its meta-train classes: what the scenario `toy` of overlay.yaml reads."""
    gen = torch.Generator().manual_seed(0)
    names = [f"c{i:02d}" for i in range(20)]
    images = {name: torch.randint(0, 256, (6, 1, SIZE, SIZE), generator=gen, dtype=torch.uint8) for name in names}
    write_store(project / "data" / "toy", "toy", images,
                {"meta_train": names[:10], "meta_val": names[10:15], "meta_test": names[15:]}, source="test")
    architecture = {"name": "conv4", "num_classes": CLASSES, "in_channels": 1, "image_size": SIZE, "width": 4}
    for index in range(2):
        torch.manual_seed(index)
        spec = MemberSpec("toy", index, "toy", tuple(names[index * CLASSES:(index + 1) * CLASSES]), "conv4",
                          architecture, seed=index)
        save_member(build_model(**architecture), spec, *member_paths(project / "results" / "pool" / "toy", index),
                    heldout_accuracy=0.2)
    overlay = {"run_scenarios": ["toy"], "datasets": {"toy": {"source": "imagefolder"}},
               "models": {"tiny_conv4": {"arch": "conv4", "width": 4}},
               "scenarios": {"toy": {"datasets": ["toy"], "architectures": ["tiny_conv4"], "members_per_dataset": 2,
                                     "image_size": SIZE, "channels": 1}},
               "evaluation": {"query": 2, "protocols": {"test1": {"test_steps": 1}}},
               "metatrain": {"shots": [1], "way": CLASSES, "query": 2, "meta_batch": 2, "iterations": 4, "eval_every": 2,
                             "checkpoint_every": 2, "val_episodes": 2, "meta_model": {"width": 4}}}
    (project / "overlay.yaml").write_text(yaml.safe_dump(overlay))


def metatrain(project: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/metatrain.py", "--scenario", "toy", "--method", "noisekd", "--shot", "1",
               "--pool", "results/pool/toy", "--out", "out/noisekd", "--checkpoint", "ckpt/noisekd.safetensors",
               "--configfile", "overlay.yaml", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(project), "DFML_DEVICE": "cpu"}  # the copy's dfml, not the checkout's
    proc = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_worked_example_adds_a_method_in_four_places_and_it_meta_trains_and_resumes(tmp_path):
    (tmp_path / "project").mkdir()
    project = copy_project(tmp_path / "project")
    before = project_files(project)
    add_the_method(project)
    after = project_files(project)

    # What changed: the method's own file, one registry line, its schema block, its params.yaml entry; nothing else.
    blocks = page_blocks()
    assert set(after) - set(before) == {"dfml/methods/noisekd.py"} and set(before) <= set(after)
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["dfml/methods/base.py", "params.yaml", "workflow/schemas/params.schema.yaml"]
    assert inserted_lines(before["dfml/methods/base.py"], after["dfml/methods/base.py"]) == \
        ['    "noisekd": ("dfml.methods.noisekd", "NoiseKDMethod"),'] == blocks["registry"].splitlines()
    assert inserted_lines(before["workflow/schemas/params.schema.yaml"],
                          after["workflow/schemas/params.schema.yaml"]) == blocks["schema"].splitlines()
    assert inserted_lines(before["params.yaml"], after["params.yaml"]) == ["  noisekd: {algorithm: noisekd, images: 8}"]

    # It meta-trains through the real entry point, with its block's defaults filled and its setting read.
    toy_data(project)
    proc = metatrain(project)
    assert "noisekd on 2 white-box members, 8 noise images per iteration" in proc.stdout
    out = project / "out" / "noisekd"
    with open(out / "curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["iteration"]) for row in rows] == [0, 1, 2, 3, 4]
    assert all(row["member"] in ("0.0", "1.0", "0", "1") and float(row["meta_loss"]) >= 0 for row in rows[1:])
    assert [row["val_test1"] != "" for row in rows] == [True, False, True, False, True]  # meta-val selection
    card = json.loads((out / "test1" / "meta_model.json").read_text())
    assert card["method"] == "noisekd" and card["init"] == "average" and (out / "test1" / "meta_model.safetensors").is_file()
    assert card["settings"]["method"] == {"algorithm": "noisekd", "images": 8, "train_steps": 1}
    state = load_checkpoint(project / "ckpt" / "noisekd.safetensors")["method"]
    assert state["iteration"] == 4 and all(int(s["step"]) == 4 for s in state["optimizer"]["state"].values())

    # Its state resumes: a rerun continues from the checkpoint instead of training again.
    again = metatrain(project)
    assert "resuming from ckpt/noisekd.safetensors at meta-iteration 4" in again.stdout
    assert json.loads((out / "test1" / "meta_model.json").read_text())["selected_iteration"] == card["selected_iteration"]

    # The report lists it in the config's order, after the methods before it and before the baselines.
    params = yaml.safe_load((project / "params.yaml").read_text())
    order = method_order(params)
    assert order[0] == "noisekd" and order[-len(params["metatest"]["baselines"]):] == params["metatest"]["baselines"]
