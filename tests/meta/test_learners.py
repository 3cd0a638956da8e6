"""dfml.meta: tasks, MAML / first-order MAML / ANIL / ProtoNet, loop and vmap meta-batches.

Gradient checks run in float64 on tiny models with smooth activations (tanh), against independent
computations: central finite differences and the explicit one-step formula (I - a H_s) g_q.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dfml.meta import (
    ANIL,
    LEARNER_NAMES,
    MAML,
    ProtoNet,
    Task,
    TaskBatch,
    batch_norm_from_primitives,
    build_learner,
    meta_batch_loss,
    stack_tasks,
)

N_WAY = 3


class TinyConvNet(nn.Module):
    """FewShotNet layout: backbone = conv + batch-statistics BN + activation + pool + flatten; head."""

    def __init__(self, in_channels: int = 1, width: int = 2, n_way: int = N_WAY, activation=nn.Tanh) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width, track_running_stats=False),
            activation(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(width * 4, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class TinyMLP(nn.Module):
    def __init__(self, in_features: int = 16, hidden: int = 3, n_way: int = N_WAY) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def double_model(model_class=TinyConvNet, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return model_class(**kwargs).double()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def random_task(seed: int = 0, shot: int = 2, query: int = 3, image_shape=(1, 4, 4), n_way: int = N_WAY,
                dtype=torch.float64) -> Task:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way)
    return Task(
        torch.randn(n_way * shot, *image_shape, generator=generator, dtype=dtype),
        labels.repeat(shot),
        torch.randn(n_way * query, *image_shape, generator=generator, dtype=dtype),
        labels.repeat(query),
    )


def outer_loss(learner, model, params, task) -> torch.Tensor:
    return learner.task_loss(model, params, task, training=True)[0]


def directional_derivative_check(fn, params: dict[str, torch.Tensor], analytic: dict[str, torch.Tensor],
                                 directions_per_entry: int = 2, eps: float = 1e-6, seed: int = 0) -> None:
    """Compare <analytic gradient, v> with central differences of the scalar fn along random v.

    Each direction touches a single entry of ``params``, so every entry is checked on its own.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, value in params.items():
        for _ in range(directions_per_entry):
            direction = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            with torch.no_grad():
                plus = fn({**params, name: value + eps * direction})
                minus = fn({**params, name: value - eps * direction})
            numeric = (plus - minus) / (2 * eps)
            expected = (analytic[name] * direction).sum()
            torch.testing.assert_close(numeric, expected, rtol=1e-5, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def detached(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in params.items()}


def assert_dicts_close(actual: dict, expected: dict, **tolerances) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerances, msg=lambda m, n=name: f"{n}: {m}")


# --- meta-gradients against independent computations -------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(("learner_class", "model_class"),
                         [(MAML, TinyMLP), (MAML, TinyConvNet), (ANIL, TinyConvNet)])
def test_second_order_meta_gradient_matches_finite_differences(learner_class, model_class, steps):
    model = double_model(model_class)
    params = params_of(model)
    task = random_task()
    learner = learner_class(inner_lr=0.5, train_steps=steps)

    loss = outer_loss(learner, model, params, task)
    analytic = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    directional_derivative_check(lambda p: outer_loss(learner, model, p, task), detached(params), analytic)

    # The check is sensitive to the second-order term: the first-order gradient fails it.
    first_order = learner_class(inner_lr=0.5, train_steps=steps, first_order=True)
    fo_loss = outer_loss(first_order, model, params, task)
    fo_gradients = dict(zip(params, torch.autograd.grad(fo_loss, list(params.values()))))
    with pytest.raises(AssertionError):
        directional_derivative_check(lambda p: outer_loss(learner, model, p, task), detached(params), fo_gradients)


def test_one_step_maml_gradient_matches_explicit_hessian_formula():
    model = double_model(TinyMLP)
    params = params_of(model)
    task = random_task()
    inner_lr = 0.5
    shapes = {name: value.shape for name, value in params.items()}
    theta = torch.cat([value.detach().reshape(-1) for value in params.values()])

    def unflatten(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = flat.split([math.prod(shape) for shape in shapes.values()])
        return {name: piece.view(shape) for (name, shape), piece in zip(shapes.items(), pieces)}

    def support_loss(flat):
        return F.cross_entropy(functional_call(model, unflatten(flat), (task.support_x,)), task.support_y)

    def query_loss(flat):
        return F.cross_entropy(functional_call(model, unflatten(flat), (task.query_x,)), task.query_y)

    support_gradient = torch.func.grad(support_loss)(theta)
    adapted = theta - inner_lr * support_gradient
    hessian = torch.autograd.functional.hessian(support_loss, theta)
    identity = torch.eye(theta.numel(), dtype=theta.dtype)
    expected = (identity - inner_lr * hessian) @ torch.func.grad(query_loss)(adapted)

    loss = outer_loss(MAML(inner_lr=inner_lr, train_steps=1), model, params, task)
    actual = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_second_order_gradient_reaches_support_images_through_the_inner_loop():
    """PURER's ECI step back-propagates the outer loss into the (pseudo) support images."""
    model = double_model(TinyConvNet)
    params = params_of(model)
    base = random_task(shot=1, query=2)
    learner = MAML(inner_lr=0.5, train_steps=1)

    def loss_for(support_x):
        return outer_loss(learner, model, params, Task(support_x, base.support_y, base.query_x, base.query_y))

    support_x = base.support_x.clone().requires_grad_()
    (analytic,) = torch.autograd.grad(loss_for(support_x), support_x)
    assert analytic.abs().max() > 1e-4
    directional_derivative_check(lambda p: loss_for(p["x"]), {"x": base.support_x}, {"x": analytic},
                                 directions_per_entry=4)

    first_order_loss = outer_loss(MAML(inner_lr=0.5, first_order=True), model, params,
                                  Task(support_x, base.support_y, base.query_x, base.query_y))
    assert not first_order_loss.requires_grad or torch.autograd.grad(
        first_order_loss, support_x, allow_unused=True)[0] is None


def test_first_order_gradient_is_query_gradient_at_adapted_params():
    model = double_model(TinyConvNet)
    params = params_of(model)
    task = random_task()
    learner = MAML(inner_lr=0.5, train_steps=2, first_order=True)

    loss = outer_loss(learner, model, params, task)
    meta_gradient = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    adapted = {n: w.detach().requires_grad_() for n, w in
               learner.adapt(model, params, task.support_x, task.support_y, steps=2, create_graph=False).items()}
    query_loss = F.cross_entropy(functional_call(model, adapted, (task.query_x,)), task.query_y)
    expected = dict(zip(adapted, torch.autograd.grad(query_loss, list(adapted.values()))))
    assert_dicts_close(meta_gradient, expected, rtol=1e-10, atol=1e-12)


def test_anil_adapts_only_the_head_and_meta_gradient_reaches_the_backbone():
    model = double_model(TinyConvNet)
    params = params_of(model)
    task = random_task()
    learner = ANIL(inner_lr=0.5, train_steps=2)

    adapted = learner.adapt(model, params, task.support_x, task.support_y, steps=2, create_graph=True)
    assert adapted.keys() == params.keys()
    for name, value in params.items():
        if name.startswith("backbone."):
            assert adapted[name] is value
        else:
            assert not torch.equal(adapted[name], value)

    loss = outer_loss(learner, model, params, task)
    gradients = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    assert all(gradients[name].abs().max() > 0 for name in params if name.startswith("backbone.0"))


# --- ProtoNet ----------------------------------------------------------------------------------------------


class FlattenNet(nn.Module):
    """Backbone = identity on the flattened image, so features are the raw pixel values."""

    def __init__(self, features: int, n_way: int) -> None:
        super().__init__()
        self.backbone = nn.Flatten()
        self.head = nn.Linear(features, n_way)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_protonet_logits_match_hand_computation():
    model = FlattenNet(2, 2).double()
    support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]], dtype=torch.float64).view(4, 1, 1, 2)
    support_y = torch.tensor([0, 0, 1, 1])
    query_x = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=torch.float64).view(2, 1, 1, 2)
    learner = ProtoNet()

    prototypes = learner.adapt(model, params_of(model), support_x, support_y, steps=0, create_graph=False)
    torch.testing.assert_close(prototypes, torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64))
    logits = learner.query_logits(model, params_of(model), prototypes, query_x)
    # query (1,1): distances^2 to (1,0) = 1, to (0,5) = 1 + 16; query (0,3): 1 + 9 = 10, 4
    torch.testing.assert_close(logits, -torch.tensor([[1.0, 17.0], [10.0, 4.0]], dtype=torch.float64))


def test_protonet_separates_a_separable_task_perfectly():
    model = FlattenNet(2, 3).double()
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)

    def around(labels):
        noise = 0.5 * torch.randn(len(labels), 2, generator=generator, dtype=torch.float64)
        return (centres[labels] + noise).view(-1, 1, 1, 2)

    support_y, query_y = torch.arange(3).repeat(2), torch.arange(3).repeat(5)
    task = Task(around(support_y), support_y, around(query_y), query_y)
    for training in (True, False):
        _, accuracy = ProtoNet().task_loss(model, params_of(model), task, training=training)
        assert accuracy.item() == 1.0


# --- meta-batches ------------------------------------------------------------------------------------------


def learner_for(name: str):
    if name == "protonet":
        return build_learner(name)
    return build_learner(name, inner_lr=0.3, train_steps=2, test_steps=3)


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_loop_and_vmap_give_same_loss_and_meta_gradient(name):
    model = double_model(TinyConvNet, activation=nn.ReLU)
    params = params_of(model)
    tasks = [random_task(seed) for seed in range(4)]
    learner = learner_for(name)
    used = [n for n in params if name != "protonet" or n.startswith("backbone.")]

    results = {}
    for batched in (False, True):
        loss, accuracy = meta_batch_loss(learner, model, params, tasks, training=True, batched=batched)
        gradients = torch.autograd.grad(loss, [params[n] for n in used])
        test_loss, test_accuracy = meta_batch_loss(learner, model, params, stack_tasks(tasks), training=False,
                                                   batched=batched)
        results[batched] = (loss, accuracy, gradients, test_loss, test_accuracy)

    (loop, vmapped) = results[False], results[True]
    for expected, actual in zip(loop, vmapped):
        if isinstance(expected, tuple):
            assert_dicts_close(dict(enumerate(actual)), dict(enumerate(expected)), rtol=1e-5, atol=1e-8)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-8)


def test_vmap_leaves_the_model_forward_as_it_was():
    model = double_model(TinyConvNet)
    meta_batch_loss(MAML(), model, params_of(model), [random_task(0), random_task(1)], training=True, batched=True)
    norm = model.backbone[1]
    assert "forward" not in vars(norm)
    assert type(norm).forward is nn.BatchNorm2d.forward


def test_vmap_refuses_batchnorm_that_updates_running_statistics():
    model = nn.Sequential(nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="running statistics"):
        with batch_norm_from_primitives(model):
            pass
    with batch_norm_from_primitives(model.eval()):  # running stats in eval: elementwise, left as is
        assert "forward" not in vars(model[0])


@pytest.mark.parametrize("batched", [False, True])
def test_sum_reduction_is_four_times_the_mean_for_identical_tasks(batched):
    model = double_model(TinyConvNet)
    params = params_of(model)
    task = random_task()
    learner = MAML()
    summed, _ = meta_batch_loss(learner, model, params, [task] * 4, training=True, batched=batched)
    mean, _ = meta_batch_loss(learner, model, params, [task] * 4, training=True, reduction="mean", batched=batched)
    single, _ = learner.task_loss(model, params, task, training=True)
    torch.testing.assert_close(summed, 4 * mean)
    torch.testing.assert_close(mean, single)


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil"])
def test_adaptation_reduces_the_support_loss(name):
    model = double_model(TinyConvNet)
    params = params_of(model)
    task = random_task()
    learner = build_learner(name, inner_lr=0.3)

    def support_loss(weights):
        return F.cross_entropy(functional_call(model, weights, (task.support_x,)), task.support_y).item()

    adapted = learner.adapt(model, params, task.support_x, task.support_y, steps=5, create_graph=False)
    assert support_loss(adapted) < support_loss(params) - 1e-3


@pytest.mark.parametrize("name", LEARNER_NAMES)
@pytest.mark.parametrize("batched", [False, True])
def test_test_time_adaptation_leaves_stored_params_untouched(name, batched):
    model = double_model(TinyConvNet)
    before = {n: w.detach().clone() for n, w in model.named_parameters()}
    loss, accuracy = meta_batch_loss(learner_for(name), model, params_of(model), [random_task(0), random_task(1)],
                                     training=False, batched=batched)
    assert not loss.requires_grad and not accuracy.requires_grad
    for n, w in model.named_parameters():
        assert torch.equal(w, before[n]) and w.grad is None


def test_evaluation_under_an_outer_no_grad_still_adapts():
    model = double_model(TinyConvNet)
    task = random_task()
    learner = MAML(inner_lr=0.3, test_steps=3)
    with torch.no_grad():
        adapted_loss, _ = learner.task_loss(model, params_of(model), task, training=False)
    unadapted_loss, _ = learner.task_loss(model, params_of(model), task, training=False, steps=0)
    assert adapted_loss != unadapted_loss


def test_default_steps_follow_training_flag():
    learner = MAML(train_steps=1, test_steps=10)
    assert (learner.default_steps(True), learner.default_steps(False)) == (1, 10)


# --- bad input ---------------------------------------------------------------------------------------------


def test_mismatched_support_lengths_are_rejected():
    x, y = torch.randn(4, 1, 4, 4), torch.arange(3)
    with pytest.raises(ValueError, match="support_x has 4 images but support_y has 3 labels"):
        Task(x, y, x, torch.arange(4) % 3)
    with pytest.raises(ValueError, match="support_x has 4 images"):
        MAML().adapt(TinyConvNet().double(), params_of(TinyConvNet()), x, y, steps=1, create_graph=False)


@pytest.mark.parametrize(("support_y", "query_y", "message"), [
    ([0, 1, 3], [0, 1, 3], r"support_y must use every label 0\.\.2 .*\[0, 1, 3\]"),
    ([-1, 0, 1], [0, 1, 1], r"support_y must use every label"),
    ([0, 1, 2], [0, 1, 5], r"query_y must lie in 0\.\.2 .*\[0, 1, 5\]"),
])
def test_labels_outside_zero_to_n_minus_one_are_rejected(support_y, query_y, message):
    x = torch.randn(3, 1, 4, 4)
    with pytest.raises(ValueError, match=message):
        Task(x, torch.tensor(support_y), x, torch.tensor(query_y))


def test_float_labels_and_unequal_image_shapes_are_rejected():
    x = torch.randn(3, 1, 4, 4)
    with pytest.raises(ValueError, match="torch.long"):
        Task(x, torch.arange(3.0), x, torch.arange(3))
    with pytest.raises(ValueError, match="differ in shape"):
        Task(x, torch.arange(3), torch.randn(3, 1, 5, 5), torch.arange(3))


def test_stack_tasks_rejects_different_shapes_and_empty_lists():
    with pytest.raises(ValueError, match="identical"):
        stack_tasks([random_task(shot=1), random_task(shot=2)])
    with pytest.raises(ValueError, match="empty"):
        stack_tasks([])
    batch = stack_tasks([random_task(0), random_task(1)])
    assert isinstance(batch, TaskBatch) and len(batch) == 2 and batch.n_way == N_WAY
    assert batch.support_x.shape == (2, N_WAY * 2, 1, 4, 4)
    assert torch.equal(batch[1].query_x, random_task(1).query_x)


def test_build_learner_registry():
    assert isinstance(build_learner("maml"), MAML) and build_learner("maml").second_order
    assert not build_learner("fomaml").second_order
    assert isinstance(build_learner("anil", inner_lr=0.1), ANIL)
    assert isinstance(build_learner("protonet"), ProtoNet)
    with pytest.raises(ValueError, match="'maml', 'fomaml', 'anil', 'protonet'"):
        build_learner("reptile")
    with pytest.raises(ValueError, match="steps"):
        build_learner("maml", train_steps=-1)


def test_meta_batch_loss_rejects_bad_options():
    model = double_model(TinyConvNet)
    with pytest.raises(ValueError, match="reduction"):
        meta_batch_loss(MAML(), model, params_of(model), [random_task()], training=True, reduction="max")
    with pytest.raises(ValueError, match="batched"):
        meta_batch_loss(MAML(), model, params_of(model), [random_task()], training=True, batched="yes")


# --- the real meta-model -----------------------------------------------------------------------------------


def test_conv4_meta_model_loop_matches_vmap():
    models = pytest.importorskip("dfml.models")
    torch.manual_seed(0)
    model = models.build_model("conv4", N_WAY, in_channels=3, image_size=16, width=8, batch_stats_only=True).double()
    params = params_of(model)
    tasks = [random_task(seed, shot=1, query=2, image_shape=(3, 16, 16)) for seed in range(2)]
    gradients = {}
    for batched in (False, True):
        loss, _ = meta_batch_loss(MAML(), model, params, tasks, training=True, batched=batched)
        gradients[batched] = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    assert_dicts_close(gradients[True], gradients[False], rtol=1e-5, atol=1e-8)
