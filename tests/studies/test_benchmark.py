"""Smoke test of the benchmark code (tools/benchmark.py, dfml.studies.bench) on tiny sizes.

No timing assertions: measured numbers belong in the benchmark output and docs/performance.md.
What is checked: the command runs end to end, writes its JSON / CSV / table / plot, the engine and
the reference agree, and the fused inversion path equals the reference exactly in float64.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

from dfml.studies.bench.reference import ReferencePurer
from dfml.studies.bench.suite import QUICK_SIZES, build_setup
from dfml.inversion import InversionEngine

from conftest import REPO_ROOT


pytestmark = pytest.mark.usefixtures("single_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_every_output(tmp_path):
    script = load_script()
    results = script.main(["--quick", "--out", str(tmp_path), "--no-profile"])
    for name in ("results.json", "results.csv", "table.txt", "scaling.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    configs = saved["configurations"]
    assert [(c["arch"], c["pool"], c["role"]) for c in configs] == [
        ("conv4", 2, "main"), ("conv4", 3, "scaling"), ("resnet18", 2, "architecture")]
    main = configs[0]
    for component in ("iteration", "inversion", "maml"):
        entry = main[component]
        assert entry["engine"]["wall_median_s"] > 0 and entry["reference"]["wall_median_s"] > 0
        assert entry["speedup_median"] > 0 and entry["gflop_reference"] > 0
    assert main["iteration"]["gflop_engine"] == pytest.approx(main["iteration"]["gflop_reference"], rel=0.05)
    assert main["icfil_episode"]["gflop"] > 0
    assert main["paths"]["auto_inversion_path"] == "fused" and main["inversion_path"] == "fused"
    paths = {"inversion_fused", "inversion_batched", "inversion_sequential", "maml_loop", "maml_vmap"}
    assert paths <= set(main["paths"])
    assert main["checks"]["inversion_float64"]["grad_max_rel_diff"] < 1e-10
    assert main["checks"]["inversion_float32"]["loss_rel_diff"] < 1e-5
    assert main["checks"]["meta_batch"]["grad_max_rel_diff"] < 1e-5
    assert all(c["peak_rss_bytes"] > 0 for c in configs)
    assert configs[2]["inversion_path"] == "fused" and configs[2]["fused_members"] == 0  # resnet: autograd members
    assert saved["matmul_peak_start"]["gflops_max"] > 0
    assert saved["scaling_fit"]["engine"]["pools"] == [2, 3]
    assert saved["bounds"] and results["bounds"] == saved["bounds"]
    with (tmp_path / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    components = {(row["arch"], row["component"], row["impl"]) for row in table}
    assert ("conv4", "iteration", "engine") in components and ("resnet18", "iteration", "reference") in components
    assert ("conv4", "icfil_episode", "engine") in components
    assert "speedup" in (tmp_path / "table.txt").read_text()


def test_reference_step_matches_the_trainer_step_from_the_same_state():
    setup = build_setup("conv4", 2, QUICK_SIZES, torch.device("cpu"), seed=1)
    trainer, reference = setup.trainer, setup.reference
    assert setup.engine.path("cpu") == "fused" and setup.engine.fused_member_ids() == [0, 1]
    torch.testing.assert_close(reference.images.detach(), trainer.pseudo.images.detach())
    # same random draws: the inversion gradients and the meta-batch losses agree
    images = trainer.pseudo.images.detach().clone().requires_grad_()
    total, _ = setup.engine.loss(images, torch.Generator().manual_seed(4))
    (engine_grad,) = torch.autograd.grad(total, [images])
    ref_images = images.detach().clone().requires_grad_()
    ref_total = reference.inversion_loss(ref_images, torch.Generator().manual_seed(4))
    (ref_grad,) = torch.autograd.grad(ref_total, [ref_images])
    torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(engine_grad, ref_grad, rtol=1e-4, atol=1e-7)
    trainer.step()
    reference.step()
    assert isinstance(reference, ReferencePurer)


@pytest.mark.parametrize("pooling,size,channels", [("flatten", 16, 1), ("adaptive", 21, 1), ("flatten", 18, 3),
                                                   ("flatten", 16, 4)])
def test_fused_conv4_path_equals_the_sequential_loop_in_float64(pooling, size, channels):
    from dfml.models import build_model

    torch.manual_seed(0)
    members = []
    for m in range(3):
        model = build_model("conv4", 4, channels, size, width=6, pooling=pooling).double()
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, torch.nn.BatchNorm2d):  # negative scales exercise the sign folding
                    layer.running_mean.uniform_(-0.5, 0.5)
                    layer.running_var.uniform_(0.5, 1.5)
                    layer.weight.uniform_(-1, 1)
        members.append((model.eval(), [f"k{(3 * m + k) % 8}" for k in range(4)]))  # overlapping classes
    classes = sorted({c for _, cs in members for c in cs})
    images = torch.randn(len(classes), 3, channels, size, size, dtype=torch.float64)
    results = {}
    for mode in ("fused", "sequential"):
        engine = InversionEngine(members, classes, mode=mode)
        x = images.clone().requires_grad_()
        total, terms = engine.loss(x, torch.Generator().manual_seed(2))
        (grad,) = torch.autograd.grad(total, [x])
        results[mode] = (total.detach(), terms, grad)
    assert engine.fused_member_ids() == [0, 1, 2]
    (total_f, terms_f, grad_f), (total_s, terms_s, grad_s) = results["fused"], results["sequential"]
    torch.testing.assert_close(total_f, total_s, rtol=1e-12, atol=1e-12)
    for name in ("ce", "bn", "tv", "l2", "total"):
        torch.testing.assert_close(terms_f[name], terms_s[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_f, grad_s, rtol=1e-10, atol=1e-14)


def test_worker_threads_give_the_serial_results():
    """One member / task per worker thread (2 threads) computes exactly what one thread computes."""
    from dfml.meta import meta_batch_loss
    from dfml.methods.purer import sample_pseudo_tasks

    setup = build_setup("conv4", 3, QUICK_SIZES, torch.device("cpu"), seed=2)
    trainer = setup.trainer
    images = trainer.pseudo.images.detach()
    tasks = sample_pseudo_tasks(images, 3, QUICK_SIZES.way, 1, QUICK_SIZES.query, torch.Generator().manual_seed(0))
    outputs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        x = images.clone().requires_grad_()
        total, terms = setup.engine.loss(x, torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(total, [x])
        loss, accuracy = meta_batch_loss(trainer.learner, trainer.model, trainer.params, tasks, training=True)
        meta_grads = torch.autograd.grad(loss, list(trainer.params.values()))
        outputs[threads] = (total.detach(), terms["total"], grad, loss.detach(), accuracy, meta_grads)
    for one, two in zip(outputs[1][:5], outputs[2][:5]):
        torch.testing.assert_close(one, two, rtol=0, atol=0)
    for one, two in zip(outputs[1][5], outputs[2][5]):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-7)  # summed over tasks in another order


def test_autograd_members_on_the_fused_path_equal_the_loop_in_float64():
    """Teachers without a fused kernel (ResNet) run per member with the fast BN term: same function."""
    from dfml.inversion.losses import bn_layer_term, fast_bn_layer_term
    from dfml.models import build_model

    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    torch.testing.assert_close(fast_bn_layer_term(x, mean, var), bn_layer_term(x, mean, var))
    assert torch.autograd.gradcheck(fast_bn_layer_term, (x, mean.requires_grad_(), var.requires_grad_()))
    torch.manual_seed(0)
    members = [(build_model("resnet10", 3, 1, 12, width=4).double().eval(), [f"k{m}{k}" for k in range(3)])
               for m in range(2)]
    classes = sorted(c for _, cs in members for c in cs)
    images = torch.randn(len(classes), 2, 1, 12, 12, dtype=torch.float64)
    grads = {}
    for mode in ("fused", "sequential"):
        engine = InversionEngine(members, classes, mode=mode)
        x = images.clone().requires_grad_()
        total, _ = engine.loss(x, torch.Generator().manual_seed(0))
        grads[mode] = (total.detach(), torch.autograd.grad(total, [x])[0])
    assert engine.fused_member_ids() == []
    torch.testing.assert_close(grads["fused"][0], grads["sequential"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["fused"][1], grads["sequential"][1], rtol=1e-10, atol=1e-14)


def test_cifarfs_preset_measures_the_13_member_colour_pool_alone(tmp_path):
    """`--preset cifarfs` at the quick sizes: one configuration, 13 Conv4 teachers on 3-channel images, with
    its iteration time, engine vs reference speed-up and fraction of peak; the sizes are in results.json."""
    from dfml.studies.bench.report import rows

    script = load_script()
    options = script.options_from_args(script.get_args_parser().parse_args(["--quick", "--preset", "cifarfs"]))
    setup = build_setup("conv4", options.main_pool, options.sizes, torch.device("cpu"))
    assert len(setup.teachers) == 13 and tuple(setup.trainer.pseudo.images.shape[-3:]) == (3, 16, 16)

    results = script.main(["--quick", "--preset", "cifarfs", "--out", str(tmp_path), "--no-profile"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["options"]["preset"] == "cifarfs" and saved["options"]["main_pool"] == 13
    sizes = saved["options"]["sizes"]
    assert (sizes["channels"], sizes["image_size"], sizes["way"], saved["options"]["shot"]) == (3, 16, 5, 1)
    assert results["options"] == saved["options"]
    assert [(c["arch"], c["pool"], c["role"]) for c in saved["configurations"]] == [("conv4", 13, "main")]
    main = saved["configurations"][0]
    assert main["fused_members"] == 13 and main["images_per_member"] == 5 * QUICK_SIZES.slots
    assert main["iteration"]["speedup_median"] > 0 and main["iteration"]["gflop_reference"] > 0
    assert main["checks"]["inversion_float64"]["grad_max_rel_diff"] < 1e-10
    iteration = next(r for r in rows(saved) if r["component"] == "iteration" and r["impl"] == "engine")
    assert iteration["wall_median_s"] > 0 and 0 < iteration["peak_fraction"]
    text = (tmp_path / "table.txt").read_text()
    assert "preset cifarfs: conv4 x13 teachers (width 8) on 3 x 16 x 16 inputs, 5-way 1-shot" in text
    assert "conv4 x13" in text and "speedup" in text and (tmp_path / "scaling.png").stat().st_size > 0


def test_without_a_preset_the_plan_and_the_table_header_are_unchanged():
    from dfml.studies.bench.report import _preset_line
    from dfml.studies.bench.suite import BenchOptions, plan

    assert [(c["arch"], c["pool"]) for c in plan(BenchOptions())] == [
        ("conv4", 20), ("conv4", 5), ("conv4", 10), ("conv4", 50), ("conv4", 100), ("resnet18", 5)]
    assert BenchOptions().preset is None and BenchOptions().sizes.channels == 1
    assert _preset_line({"main_pool": 20, "sizes": {}}) == []


def test_cuda_runs_in_full_float32_like_the_cpu(monkeypatch):
    """cuDNN's default TF32 convolutions made GPU gradients differ from the float32 reference by up to 17%
    (H200): a CUDA device turns TF32 off before anything runs."""
    import torch

    from dfml.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    defaults = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert pick_device("cuda").type == "cuda"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = defaults


def test_evaluation_preset_compares_the_paths_and_bounds_what_keeping_the_kernels_allows(tmp_path):
    """`--preset evaluation` at the quick sizes: every cell scored on both paths (the batched one equal to the
    one-thread per-episode path), and on CPU the kernels' one-thread time and the ceiling it implies."""
    script = load_script()
    script.main(["--quick", "--preset", "evaluation", "--out", str(tmp_path), "--threads", "2"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(c["shot"], c["calibration"]) for c in saved["cells"]] == [
        (1, "plain"), (1, "icfil"), (5, "plain"), (5, "icfil")]
    for cell in saved["cells"]:
        assert cell["batched_equals_one_thread_reference"] is True
        assert cell["speedup"] > 0 and cell["gflop_per_episode"] > 0
        assert 0 < cell["kernel_ms_per_episode_one_thread"] < cell["one_thread_ms_per_episode"]
        assert cell["ceiling_keeping_kernels"] == pytest.approx(
            cell["per_episode_ms_per_episode"] / (cell["kernel_ms_per_episode_one_thread"] / 2))
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].endswith("| conv/GEMM ms, 1 thread (share) | ceiling keeping the kernels |")
    assert len(table) == 2 + 4 and all(row.endswith("x |") for row in table[2:])
