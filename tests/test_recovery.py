"""Generator-based task recovery (dfml/inversion/recovery.py): black box through the zero-order estimator,
white box with CE + BN statistics; tiny models, a few steps."""

import pytest
import torch

from dfml.inversion.recovery import BoundaryTerm, RecoverySettings, recover_from_api, recover_from_model
from dfml.models import build_model
from dfml.models.access import BlackBoxAPI

FORMAT = dict(channels=1, image_size=16, mean=[0.5], std=[0.25])
FAST = RecoverySettings(steps=60, lr=0.01, latent_dim=16, generator_width=8, q=16, mu=0.005, query_batch=512)


CENTRES = [(4, 4), (4, 11), (11, 4), (11, 11), (8, 8)]


def blob_images(labels, generator):
    """Class k: a bright Gaussian blob at CENTRES[k] on noise; pixels in [0, 1]."""
    grid = torch.arange(16.0)
    centres = torch.tensor(CENTRES, dtype=torch.float32)[labels]
    rows = (grid[None, :] - centres[:, :1]) ** 2
    cols = (grid[None, :] - centres[:, 1:]) ** 2
    blob = torch.exp(-(rows[:, :, None] + cols[:, None, :]) / 6.0)
    return (0.8 * blob + 0.2 * torch.rand(len(labels), 16, 16, generator=generator)).unsqueeze(1)


def teacher(seed=0):
    """A conv4 trained to tell the five blob positions apart: a member whose classes can be recovered."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model("conv4", 5, in_channels=1, image_size=16, width=8).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        labels = torch.randint(0, 5, (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model((blob_images(labels, generator) - 0.5) / 0.25), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def api_loss(model, batch, classes):
    logits = model(batch.images)[:, classes]
    return float(torch.nn.functional.cross_entropy(logits, batch.labels).detach())


def test_black_box_recovery_lowers_the_api_loss_and_counts_its_queries():
    model = teacher()
    api = BlackBoxAPI.from_model(model, [f"c{i}" for i in range(5)], "toy")
    short = recover_from_api(api, [3, 1], 4, settings=RecoverySettings(**{**FAST.__dict__, "steps": 1}),
                             rng=torch.Generator().manual_seed(0), **FORMAT)
    api.queries = 0
    batch = recover_from_api(api, [3, 1], 4, settings=FAST, rng=torch.Generator().manual_seed(0), **FORMAT)
    assert batch.images.shape == (8, 1, 16, 16) and batch.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert api.queries == FAST.steps * 8 * (FAST.q + 1)  # base losses + q perturbations per image and step
    assert api_loss(model, batch, [3, 1]) < 0.3 * api_loss(model, short, [3, 1])
    assert (model(batch.images)[:, [3, 1]].argmax(1) == batch.labels).float().mean() >= 0.75
    assert batch.step > 0 and not batch.images.requires_grad


def test_recovery_is_reproducible_from_its_rng():
    api = BlackBoxAPI.from_model(teacher(), [f"c{i}" for i in range(5)], "toy")
    settings = RecoverySettings(**{**FAST.__dict__, "steps": 3})
    a = recover_from_api(api, [0, 1], 2, settings=settings, rng=torch.Generator().manual_seed(5), **FORMAT)
    b = recover_from_api(api, [0, 1], 2, settings=settings, rng=torch.Generator().manual_seed(5), **FORMAT)
    c = recover_from_api(api, [0, 1], 2, settings=settings, rng=torch.Generator().manual_seed(6), **FORMAT)
    assert torch.equal(a.images, b.images) and a.loss == b.loss
    assert not torch.equal(a.images, c.images)


def test_boundary_term_moves_queries_toward_the_students_boundary_without_touching_the_student():
    model = teacher(0)
    student = teacher(1)
    student_params = {k: v.clone() for k, v in student.state_dict().items()}
    api = BlackBoxAPI.from_model(model, [f"c{i}" for i in range(5)], "toy")

    def student_logits(images):
        return torch.func.functional_call(student, {k: v.detach() for k, v in student.named_parameters()}, images)

    def l1(batch):
        with torch.no_grad():
            return float((model(batch.images)[:, [0, 1]] - student(batch.images)[:, :2]).abs().mean())

    settings = RecoverySettings(**{**FAST.__dict__, "steps": 40})
    plain = recover_from_api(api, [0, 1], 6, settings=settings, rng=torch.Generator().manual_seed(0), **FORMAT)
    pushed = recover_from_api(api, [0, 1], 6, settings=settings, rng=torch.Generator().manual_seed(0), **FORMAT,
                              boundary=BoundaryTerm(student_logits, weight=5.0))
    assert l1(pushed) > l1(plain)  # -L1 in the loss: API and student disagree more on the recovered queries
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in student_params.items())


def test_white_box_recovery_matches_classes_and_bn_statistics():
    model = teacher()
    settings = RecoverySettings(**{**FAST.__dict__, "steps": 40, "bn": 1.0})
    first = recover_from_model(model, [4, 2, 0], 3, settings=RecoverySettings(**{**settings.__dict__, "steps": 1}),
                               rng=torch.Generator().manual_seed(0), **FORMAT)
    batch = recover_from_model(model, [4, 2, 0], 3, settings=settings, rng=torch.Generator().manual_seed(0), **FORMAT)
    assert batch.loss < 0.3 * first.loss
    predicted = model(batch.images)[:, [4, 2, 0]].argmax(1)
    assert (predicted == batch.labels).float().mean() >= 0.66


def test_settings_refuse_a_budget_that_cannot_run():
    with pytest.raises(ValueError, match="steps >= 1, q >= 1, mu > 0"):
        RecoverySettings(q=0)


def test_the_boundary_term_costs_no_extra_query():
    model, student = teacher(0), teacher(1)
    api = BlackBoxAPI.from_model(model, [f"c{i}" for i in range(5)], "toy")
    settings = RecoverySettings(**{**FAST.__dict__, "steps": 3})
    recover_from_api(api, [0, 1], 2, settings=settings, rng=torch.Generator().manual_seed(0), **FORMAT,
                     boundary=BoundaryTerm(lambda x: student(x).detach(), weight=1.0))
    assert api.queries == 3 * 4 * (settings.q + 1)  # the base answers serve the loss and the exact part
