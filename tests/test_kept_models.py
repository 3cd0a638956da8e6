"""The meta-models kept at chosen iterations (dfml/kept_models.py): written to the job's output and to the store
beside its checkpoint; a resumed run restores those up to its checkpoint and drops later ones, a fresh run
starts empty."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from dfml.kept_models import KeptModels


def model(value: float) -> torch.nn.Module:
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def kept_weights(folder) -> dict[str, float]:
    return {p.name: float(load_file(p / "meta_model.safetensors")["weight"][0, 0]) for p in sorted(folder.iterdir())}


def test_models_are_kept_in_the_output_and_the_store_with_their_card(tmp_path):
    kept = KeptModels([10, 20], tmp_path / "out" / "kept", tmp_path / "ckpt.kept")
    assert kept and kept.keeps(10) and not kept.keeps(15)
    kept.start_over()
    kept.keep(10, model(1.0), {"method": "purer"})
    assert kept_weights(tmp_path / "out" / "kept") == kept_weights(tmp_path / "ckpt.kept") == {"iter10": 1.0}
    card = json.loads((tmp_path / "out" / "kept" / "iter10" / "meta_model.json").read_text())
    assert card == {"method": "purer", "kept_iteration": 10}


def test_a_resumed_run_restores_the_kept_models_up_to_its_checkpoint_and_a_fresh_one_starts_empty(tmp_path):
    out, store = tmp_path / "out" / "kept", tmp_path / "ckpt.kept"
    kept = KeptModels([10, 20, 30], out, store)
    kept.start_over()
    for iteration in (10, 20, 30):
        kept.keep(iteration, model(iteration), {})
    (tmp_path / "out").joinpath("kept").rename(tmp_path / "deleted")  # Snakemake removed the failed job's outputs
    assert kept.resume(20) == [10, 20]  # the checkpoint was written at 25: the model of 30 is made again
    assert kept_weights(out) == kept_weights(store) == {"iter10": 10.0, "iter20": 20.0}
    kept.start_over()  # a checkpoint for other settings or code: nothing of the old run stays
    assert list(out.iterdir()) == [] and not store.exists()


def test_without_iterations_to_keep_nothing_is_written(tmp_path):
    kept = KeptModels([], tmp_path / "out" / "kept", tmp_path / "ckpt.kept")
    kept.start_over()
    assert not kept and not (tmp_path / "out").exists()
