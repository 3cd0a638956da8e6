"""FREE (dfml/methods/free/): the method, its meta-generator (meta_generator.py) and BELL (alignment.py), on tiny
tensors against hand computations and independent references.

The exact-resume contract runs in tests/methods/test_loop.py (TINY["free"] of tests/methods/tiny_jobs.py) and,
killed mid-run, in tests/workflow/test_preemption.py (GENERATIVE["free"])."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.inversion.augment import normalize, random_crop_flip
from dfml.inversion.recovery import RecoverySettings, relative_labels
from dfml.meta import build_learner
from dfml.methods.base import method_class
from dfml.methods.free.alignment import aligned_update, reptile_direction, sequential_steps
from dfml.methods.free.meta_generator import AdversarialTerm, MetaGenerator, agreeing_kl, recovery_loss
from dfml.models import build_model
from tiny_jobs import SIZE, contract_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN, STD = (0.5,), (0.25,)
TINY_ADAPTATION = RecoverySettings(steps=3, latent_dim=4, generator_width=2)


def tiny_teacher(seed: int, classes: int = 3, image_size: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, classes)).eval()


def meta_generator(seed: int = 0) -> MetaGenerator:
    return MetaGenerator(1, 8, TINY_ADAPTATION, meta_lr=1e-2, rng=torch.Generator().manual_seed(seed))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- the meta-generator ---------------------------------------------------------------------------------------

def test_an_adaptation_changes_its_copy_and_never_the_meta_generator():
    meta = meta_generator()
    before = weights(meta.generator)
    adaptation = meta.adapt(tiny_teacher(1), [2, 0], 3, mean=MEAN, std=STD, rng=torch.Generator().manual_seed(5))
    after = weights(meta.generator)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in meta.generator.parameters())
    adapted = dict(adaptation.generator.named_parameters())
    assert any(not torch.equal(before[k], adapted[k].detach()) for k in adapted)
    assert adaptation.batch.images.shape == (6, 1, 8, 8) and adaptation.batch.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert set(adaptation.gradients) == set(adapted) and 0 <= adaptation.batch.step < TINY_ADAPTATION.steps
    assert any(float(g.abs().sum()) > 0 for g in adaptation.gradients.values())


def test_the_adversarial_term_counts_only_images_where_teacher_and_student_agree():
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    student = torch.tensor([[1.0, 0.5], [1.0, 0.0], [0.0, 0.5]])  # agrees on images 0 and 2, not on 1

    def kl(t_row, s_row):
        p = [math.exp(v) / sum(math.exp(u) for u in t_row) for v in t_row]
        q = [math.exp(v) / sum(math.exp(u) for u in s_row) for v in s_row]
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))

    expected = (kl([2.0, 0.0], [1.0, 0.5]) + kl([1.0, 3.0], [0.0, 0.5])) / 3  # image 1 counts as zero
    assert float(agreeing_kl(teacher, student)) == pytest.approx(expected, rel=1e-6)
    labels = torch.tensor([0, 1, 1])
    ce = F.cross_entropy(teacher, labels)
    assert float(recovery_loss(teacher, labels, student, adversarial=2.0)) == pytest.approx(
        float(ce) - 2.0 * expected, rel=1e-6)
    assert float(recovery_loss(teacher, labels)) == pytest.approx(float(ce))

    student = student.clone().requires_grad_()
    agreeing_kl(teacher, student).backward()
    assert torch.equal(student.grad[1], torch.zeros(2)) and bool(student.grad[[0, 2]].abs().sum() > 0)


def test_the_adversarial_gradient_reaches_the_images_only_through_the_teacher():
    """The official code takes the student's logits under no_grad: an adaptation against the student is the
    one against its detached logits, bit for bit, and no gradient reaches the student; the term still acts."""
    student = tiny_teacher(9, classes=2)
    runs = {}
    for name, term in (("student", AdversarialTerm(student, 1.0)),
                       ("detached", AdversarialTerm(lambda x: student(x).detach(), 1.0)), ("none", None)):
        runs[name] = meta_generator().adapt(tiny_teacher(1), [2, 0], 3, mean=MEAN, std=STD,
                                            rng=torch.Generator().manual_seed(5), adversarial=term)
    assert all(p.grad is None for p in student.parameters())
    assert torch.equal(runs["student"].batch.images, runs["detached"].batch.images)
    assert all(torch.equal(runs["student"].gradients[k], runs["detached"].gradients[k]) for k in runs["none"].gradients)
    assert any(not torch.equal(runs["student"].gradients[k], runs["none"].gradients[k]) for k in runs["none"].gradients)


def reference_last_step_gradient(meta: MetaGenerator, teacher: nn.Module, classes: list[int], per_class: int,
                                 rng: torch.Generator, student: nn.Module) -> dict[str, torch.Tensor]:
    """The adaptation written out: k - 1 Adam steps on a copy, then autograd's gradient of the k-th step's loss
    (the student's logits detached, as the official code computes them without gradient)."""
    s = meta.settings
    fast = copy.deepcopy(meta.generator)
    params = dict(fast.named_parameters())
    labels = relative_labels(len(classes), per_class)
    z = torch.randn(len(labels), s.latent_dim, generator=rng).requires_grad_()
    optimizer = torch.optim.Adam([*params.values(), z], lr=s.lr, betas=s.betas)
    for step in range(s.steps):
        x = normalize(random_crop_flip(fast(z), rng, s.padding, s.flip), MEAN, STD)
        t, st = teacher(x)[:, classes], student(x)[:, :len(classes)].detach()
        agree = (t.argmax(1) == st.argmax(1)).float()
        kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(st, 1))).sum(1)
        loss = F.cross_entropy(t, labels) - (agree * kl).mean()
        if step == s.steps - 1:
            return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError("unreachable")


def test_the_first_order_meta_update_is_one_adam_step_on_the_summed_last_step_gradients():
    meta, student = meta_generator(), tiny_teacher(9, classes=2)
    teachers = [(tiny_teacher(1), [2, 0]), (tiny_teacher(2), [1, 2])]
    reference = copy.deepcopy(meta)
    rng, reference_rng = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    adaptations = [meta.adapt(t, c, 2, mean=MEAN, std=STD, rng=rng, adversarial=AdversarialTerm(student, 1.0))
                   for t, c in teachers]
    expected = [reference_last_step_gradient(reference, t, c, 2, reference_rng, student) for t, c in teachers]
    summed = {k: expected[0][k] + expected[1][k] for k in expected[0]}
    for k in summed:
        assert torch.allclose(adaptations[0].gradients[k] + adaptations[1].gradients[k], summed[k], atol=1e-6), k

    meta.meta_update([a.gradients for a in adaptations])
    optimizer = torch.optim.Adam(reference.generator.parameters(), lr=1e-2, betas=(0.5, 0.999))
    for name, p in reference.generator.named_parameters():  # (Adam divides out the scale: conv biases before
        p.grad = adaptations[0].gradients[name] + adaptations[1].gradients[name]  # a BN get ~1e-9 noise)
    optimizer.step()
    for name, p in reference.generator.named_parameters():
        assert torch.allclose(dict(meta.generator.named_parameters())[name], p, atol=1e-6), name
    assert all(p.grad is None for p in meta.generator.parameters())

    meta.meta_update([a.gradients for a in adaptations])  # persistent: the moments carry over (step 2)
    assert {int(state["step"]) for state in meta.optimizer.state.values()} == {2}


def test_the_meta_generator_state_round_trips_through_a_checkpoint(tmp_path):
    meta = meta_generator()
    adaptation = meta.adapt(tiny_teacher(1), [0, 1], 2, mean=MEAN, std=STD, rng=torch.Generator().manual_seed(1))
    meta.meta_update([adaptation.gradients])
    save_checkpoint(tmp_path / "g.safetensors", meta.state_dict())
    restored = meta_generator(seed=3)
    restored.load_state_dict(load_checkpoint(tmp_path / "g.safetensors"))
    for rng_seed in (7, 8):  # the same adaptation and the same next meta-step
        a = meta.adapt(tiny_teacher(2), [1, 2], 2, mean=MEAN, std=STD, rng=torch.Generator().manual_seed(rng_seed))
        b = restored.adapt(tiny_teacher(2), [1, 2], 2, mean=MEAN, std=STD,
                           rng=torch.Generator().manual_seed(rng_seed))
        assert torch.equal(a.batch.images, b.batch.images)
        meta.meta_update([a.gradients]), restored.meta_update([b.gradients])
    assert all(torch.equal(v, weights(restored.generator)[k]) for k, v in weights(meta.generator).items())


# -- BELL ------------------------------------------------------------------------------------------------------

def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.exp() / logits.exp().sum(1, keepdim=True)


def test_bell_is_the_reptile_direction_after_sequential_steps_on_a_hand_computed_two_task_case():
    """A bias-free linear model: the KD gradient of KL(p_T || softmax(x W^T)) (batchmean) is
    (p_S - p_T)^T x / N, so two sequential SGD steps and the Reptile direction are written by hand."""
    from dfml.methods.generative import distillation_loss

    torch.manual_seed(0)
    theta = torch.randn(2, 3, dtype=torch.float64)
    tasks = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(2)]
    lr, scale = 0.3, 5.0

    def hand_gradient(w, x, teacher):
        return (softmax_rows(x @ w.T) - softmax_rows(teacher)).T @ x / len(x)

    first = theta - lr * hand_gradient(theta, *tasks[0])
    second = first - lr * hand_gradient(first, *tasks[1])
    direction = scale * (theta - second)

    params = {"weight": theta.clone().requires_grad_()}
    losses = [lambda w, x=x, t=t: distillation_loss(x @ w["weight"].T, t) for x, t in tasks]
    adapted, values = sequential_steps(params, losses, lambda ts: torch.optim.SGD(ts, lr=lr))
    assert torch.allclose(adapted["weight"], second, atol=1e-12) and torch.equal(params["weight"].detach(), theta)
    assert values[1] == pytest.approx(float(distillation_loss(tasks[1][0] @ first.T, tasks[1][1])))
    assert torch.allclose(reptile_direction(params, adapted, scale)["weight"], direction, atol=1e-12)

    meta_optimizer = torch.optim.SGD(params.values(), lr=0.1)  # theta <- theta - 0.1 * direction
    aligned_update(params, losses, meta_optimizer, optimizer=lambda ts: torch.optim.SGD(ts, lr=lr), scale=scale)
    assert torch.allclose(params["weight"].detach(), theta - 0.1 * direction, atol=1e-12)
    assert params["weight"].grad is None
    # the order matters (second order): the reverse order gives another direction
    reverse, _ = sequential_steps({"weight": theta}, losses[::-1], lambda ts: torch.optim.SGD(ts, lr=lr))
    assert not torch.allclose(reverse["weight"], second, atol=1e-9)


# -- the method ------------------------------------------------------------------------------------------------

class Counting(nn.Module):
    """A member that counts its forward passes and keeps the batches it answers without gradient (the teacher
    logits distilled into the meta-model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls, self.teacher_calls = model, 0, []

    def forward(self, images):
        self.calls += 1
        if not torch.is_grad_enabled():
            self.teacher_calls.append(images.detach().clone())
        return self.model(images)


def free_inputs(**method):
    inputs = contract_inputs("free")
    inputs.settings["method"].update(method)
    return inputs


def test_every_teacher_recovers_with_its_own_module_and_all_batches_reach_the_memory():
    """The official code stores only the last teacher's batch, and in its mixed-architecture branch one module
    serves as every teacher."""
    inputs = free_inputs(teachers=4, memory_batches=8, warmup_events=0)
    torch.manual_seed(3)
    inputs.pool[1].model = build_model("conv4", 3, 1, SIZE, width=6).eval()  # heterogeneous: another width
    for member in inputs.pool:
        member.model = Counting(member.model)
    method = method_class("free").build(inputs)
    steps = inputs.settings["method"]["adaptation_steps"]
    log = method.step()
    assert log.values["generated"] and not log.values["warmup"] and sum(method.draws) == 4
    assert sum(count > 0 for count in method.draws) > 1  # the seed draws several members, so the bugs would show
    for index, member in enumerate(inputs.pool):
        count = method.draws[index]
        assert member.model.calls == count * (steps + 1), index  # k adaptation steps + its teacher logits
        for name in member.qualified_classes:
            assert method.memory.batches(name, "support") == count and method.memory.batches(name, "query") == count
        if count:
            stored = torch.cat([torch.cat([method.memory.images(n, "support"), method.memory.images(n, "query")])
                                for n in member.qualified_classes])
            for call in member.model.teacher_calls:  # distilled on the images recovered from itself
                assert all(bool((stored == row).flatten(1).all(1).any()) for row in call)
    assert method.memory.num_images() == 4 * 3 * inputs.settings["method"]["per_class"]


def record_adaptations(method) -> list:
    """The ``adversarial`` argument of every adaptation the method asks its meta-generator for."""
    terms, adapt = [], method.meta_generator.adapt

    def recording(*args, adversarial=None, **kwargs):
        terms.append(adversarial)
        return adapt(*args, adversarial=adversarial, **kwargs)

    method.meta_generator.adapt = recording
    return terms


def test_the_warm_up_trains_only_the_meta_generator_without_the_student_then_bell_moves_the_meta_model():
    """As the official code: warm-up events synthesise with student=None and store nothing; the first event
    after them fills the memory and aligns the meta-model, and replay follows."""
    method = method_class("free").build(free_inputs(warmup_events=2, generate_interval=50))
    terms = record_adaptations(method)
    meta_model = {k: v.detach().clone() for k, v in method.params.items()}
    generator = weights(method.meta_generator.generator)
    for _ in range(2):
        log = method.step()
        assert log.values["warmup"] and log.values["generated"] and math.isfinite(log.meta_loss)
    assert len(terms) == 2 * method.settings.teachers and all(term is None for term in terms)
    assert len(method.memory) == 0
    assert all(torch.equal(meta_model[k], v) for k, v in method.params.items())
    assert any(not torch.equal(generator[k], v) for k, v in weights(method.meta_generator.generator).items())
    log = method.step()  # an event after the warm-up: against the student, into the memory, BELL
    assert log.values["generated"] and not log.values["warmup"] and method.events == 3
    assert all(isinstance(term, AdversarialTerm) for term in terms[2 * method.settings.teachers:])
    assert len(method.memory) > 0
    assert any(not torch.equal(meta_model[k], v) for k, v in method.params.items())
    before = {k: v.detach().clone() for k, v in method.params.items()}
    log = method.step()  # the memory is full enough: replay
    assert not log.values["generated"] and not log.values["warmup"]
    assert any(not torch.equal(before[k], v) for k, v in method.params.items())


def test_warmup_memory_files_the_warm_ups_batches_and_adversarial_zero_drops_the_term():
    method = method_class("free").build(free_inputs(warmup_events=1, warmup_memory=True, adversarial=0.0))
    terms = record_adaptations(method)
    method.step()
    assert method.memory.num_images() == method.settings.teachers * 3 * method.settings.per_class
    method.trigger.due = True
    method.step()
    assert terms and all(term is None for term in terms)


def test_replay_adapts_with_the_methods_own_inner_steps():
    """FREE's scripts replay with --inner_update_num 5: the job's learner (method_metatrain) takes five steps."""
    from dfml.config import method_metatrain
    from dfml.evaluation.protocol import make_learner

    inputs = free_inputs(warmup_events=0, generate_interval=50)
    inputs.learner = make_learner(method_metatrain(inputs.settings["metatrain"], inputs.settings["method"]))
    method = method_class("free").build(inputs)
    method.step()  # the first event fills the memory
    steps, adapt = [], method.learner.adapt

    def recording(*args, steps_taken=steps, **kwargs):
        steps_taken.append(kwargs["steps"])
        return adapt(*args, **kwargs)

    method.learner.adapt = recording
    log = method.step()
    assert not log.values["generated"] and steps == [5] * method.settings.meta_batch


def test_free_refuses_a_learner_without_an_inner_loop_and_batches_too_small_to_split():
    inputs = free_inputs()
    inputs.learner = build_learner("protonet")
    with pytest.raises(ValueError, match="free replays its memory with MAML and aligns every parameter by BELL: use "
                                         "learner maml or fomaml, not protonet"):
        method_class("free").build(inputs)
    with pytest.raises(ValueError, match="a recovered batch has 2 images per class, split into support and query "
                                         "images, and replay tasks draw 1 support .* raise per_class to at least 3"):
        method_class("free").build(free_inputs(per_class=2))
