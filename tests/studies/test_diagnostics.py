import csv

import pytest
import torch
from safetensors.torch import save_file

from dfml.studies.diagnostics import curve_bn_and_pushes, drift_row, pseudo_drift


def saved(images, v):
    return {"images": images, "adam.exp_avg": torch.zeros_like(images), "adam.exp_avg_sq": v}


def test_drift_measures_pixel_change_and_adam_denominator_growth():
    warm_images = torch.zeros(2, 50, 1, 2, 2)  # 100 images
    final_images = warm_images.clone()
    final_images[0, 0] = 3.0  # one image moved by 3 per pixel, one by 1, the rest not at all
    final_images[1, 7] = -1.0
    v_warm = torch.full_like(warm_images, 4.0)
    v_final = v_warm.clone()
    v_final[0, 0] = 400.0  # sqrt(v) 10x larger for the pushed image
    drift = pseudo_drift(saved(warm_images, v_warm), saved(final_images, v_final))
    assert drift["displacement"]["q50"] == 0.0
    assert drift["displacement"]["q99"] == pytest.approx(1.0 + 0.01 * 2.0)  # linear interpolation at 99%
    assert drift["adam_rms_ratio"]["q50"] == pytest.approx(1.0)
    assert drift["adam_rms_ratio"]["q99"] == pytest.approx(1.0 + 0.01 * 9.0)


def test_drift_refuses_mismatched_or_stateless_pseudo_data():
    a = saved(torch.zeros(2, 3, 1, 2, 2), torch.ones(2, 3, 1, 2, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        pseudo_drift(a, saved(torch.zeros(2, 4, 1, 2, 2), torch.ones(2, 4, 1, 2, 2)))
    with pytest.raises(ValueError, match="no Adam moments"):
        pseudo_drift({"images": torch.zeros(2, 3, 1, 2, 2)}, a)


def test_drift_row_reads_a_metatrain_run(tmp_path):
    images = torch.zeros(2, 4, 1, 2, 2)
    save_file(saved(images, torch.ones_like(images)), tmp_path / "warm.safetensors")
    run = tmp_path / "purer" / "shot1"
    run.mkdir(parents=True)
    save_file(saved(images + 0.5, torch.ones_like(images)), run / "pseudo_final.safetensors")
    with open(run / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["iteration", "inversion_bn", "adversarial"])
        writer.writeheader()
        writer.writerows([{"iteration": 0, "inversion_bn": "", "adversarial": ""},
                          {"iteration": 1, "inversion_bn": 12.5, "adversarial": 0},
                          {"iteration": 2, "inversion_bn": 30.0, "adversarial": 1}])
    row = drift_row(tmp_path / "warm.safetensors", run)
    assert row["bn_first"] == 12.5 and row["bn_last"] == 30.0 and row["adversarial_steps"] == 1
    assert row["displacement_q50"] == pytest.approx(0.5)
    assert curve_bn_and_pushes(run / "curve.csv")["adversarial_steps"] == 1
