"""Generator-based task recovery (dfml/inversion/recovery.py): black box through the zero-order estimator,
white box with CE + BN statistics; tiny models, a few steps."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO_ROOT
from dfml.config import load_params
from dfml.inversion.augment import normalize
from dfml.inversion.recovery import (BoundaryTerm, RecoverySettings, augmented_view, boundary_query_loss,
                                     recover_from_api, recover_from_model)
from dfml.methods.base import method_class
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


def l1_to(model, student, batch):
    """Mean over images of sum_c |api_c - student_c| on the recovered classes (0, 1)."""
    with torch.no_grad():
        return float((model(batch.images)[:, [0, 1]] - student(batch.images)[:, :2]).abs().sum(1).mean())


@pytest.mark.usefixtures("single_thread")
def test_boundary_term_moves_queries_toward_the_students_boundary_without_touching_the_student():
    """Paired over 16 seeds (the same RNG with and without the term), so that no single trajectory decides it:
    the mean rise of the API-student L1 must exceed two standard errors (measured: 3.2 to 4.3 of them, on one
    and two threads). Removing the term makes every difference 0; reversing it makes them negative."""
    model, student = teacher(0), teacher(1)
    student_params = {k: v.clone() for k, v in student.state_dict().items()}
    api = BlackBoxAPI.from_model(model, [f"c{i}" for i in range(5)], "toy")
    settings = RecoverySettings(**{**FAST.__dict__, "steps": 40})
    term = BoundaryTerm(student, weight=1.0)  # the official weight; the student's logits are held fixed
    rises = []
    for seed in range(16):
        plain = recover_from_api(api, [0, 1], 6, settings=settings, rng=torch.Generator().manual_seed(seed), **FORMAT)
        pushed = recover_from_api(api, [0, 1], 6, settings=settings, rng=torch.Generator().manual_seed(seed),
                                  **FORMAT, boundary=term)
        rises.append(l1_to(model, student, pushed) - l1_to(model, student, plain))
    rises = torch.tensor(rises)
    assert float(rises.mean()) > 2 * float(rises.std()) / math.sqrt(len(rises)), rises
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in student_params.items())


def test_the_boundary_loss_is_the_official_sum_over_classes_where_api_and_student_agree():
    api_logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0], [1.0, 4.0, -2.0]])
    student_logits = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.5, 1.5, 1.0]])  # agree on rows 0 and 2
    labels = torch.tensor([0, 2, 1])
    hand = torch.tensor([
        -math.log(math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(0.5))) - 0.5 * (1 + 1 + 0.5),
        -math.log(math.exp(3) / (1 + math.exp(1) + math.exp(3))),  # disagree: CE only
        -math.log(math.exp(4) / (math.exp(1) + math.exp(4) + math.exp(-2))) - 0.5 * (0.5 + 2.5 + 3.0)])
    assert torch.allclose(boundary_query_loss(api_logits, labels, student_logits, 0.5), hand)
    assert torch.allclose(boundary_query_loss(api_logits, labels, None, 0.5),
                          F.cross_entropy(api_logits, labels, reduction="none"))


def test_a_recovery_scores_its_images_with_the_official_boundary_loss():
    """The kept loss of a one-step recovery is the boundary loss of the images the API and the student saw."""
    model = teacher(0)
    api = BlackBoxAPI.from_model(model, [f"c{i}" for i in range(5)], "toy")
    seen = []

    def student(images):  # agrees with the API on even rows (halved logits), disagrees on odd rows (negated)
        seen.append(images.detach().clone())
        logits = model(images)[:, [0, 1]].detach()
        return torch.where((torch.arange(len(images)) % 2 == 0)[:, None], 0.5 * logits, -logits)

    settings = RecoverySettings(**{**FAST.__dict__, "steps": 1})
    batch = recover_from_api(api, [0, 1], 4, settings=settings, rng=torch.Generator().manual_seed(0), **FORMAT,
                             boundary=BoundaryTerm(student, weight=2.0))
    api_logits = model(seen[0])[:, [0, 1]].detach()
    agree = torch.tensor([1.0, 0.0] * 4)
    hand = F.cross_entropy(api_logits, batch.labels, reduction="none") - 2.0 * agree * 0.5 * api_logits.abs().sum(1)
    assert batch.loss == pytest.approx(float(hand.mean()), rel=1e-5)


def test_the_boundary_term_reaches_the_student_only_when_asked():
    """Official: the student's logits are constants of the loss; ``through_student`` adds their exact gradient."""
    model, student = teacher(0), teacher(1)
    api = BlackBoxAPI.from_model(model, [f"c{i}" for i in range(5)], "toy")
    settings = RecoverySettings(**{**FAST.__dict__, "steps": 3})
    frozen = {k: v.detach() for k, v in student.named_parameters()}

    def student_logits(images):  # as BiDf-MKD asks its meta-model: weights detached, images not
        return torch.func.functional_call(student, frozen, (images,))

    runs = {}
    for name, term in (("official", BoundaryTerm(student_logits, weight=1.0)),
                       ("detached", BoundaryTerm(lambda x: student_logits(x).detach(), weight=1.0)),
                       ("through", BoundaryTerm(student_logits, weight=1.0, through_student=True))):
        runs[name] = recover_from_api(api, [0, 1], 3, settings=settings, rng=torch.Generator().manual_seed(0),
                                      **FORMAT, boundary=term)
        assert all(p.grad is None for p in student.parameters()), name
    assert torch.equal(runs["official"].images, runs["detached"].images)
    assert not torch.equal(runs["official"].images, runs["through"].images)


def test_recoveries_do_not_flip_by_default_as_the_pool_is_pretrained_without_flips():
    """Pool members classify their images, not their mirror images (dfml/pretrain.py does not augment): no
    generator method flips unless its params entry says ``flip: true``."""
    schema = yaml.safe_load((REPO_ROOT / "workflow" / "schemas" / "params.schema.yaml").read_text())
    assert not any("flip" in key or "augment" in key for key in schema["properties"]["pretrain"]["properties"])
    pixels = torch.rand(64, 1, 8, 8)
    seen = augmented_view(pixels, torch.Generator().manual_seed(0), RecoverySettings(padding=0), [0.5], [0.25])
    assert torch.equal(seen, normalize(pixels, [0.5], [0.25]))
    flipped = augmented_view(pixels, torch.Generator().manual_seed(0), RecoverySettings(padding=0, flip=True),
                             [0.5], [0.25])
    assert not torch.equal(flipped, seen)  # flip: true still mirrors (some of 64 images)
    params = load_params(REPO_ROOT / "params.yaml")
    for algorithm in ("bidfmkd", "taco", "tgr", "free"):
        job = {"metatrain": params["metatrain"], "method": {"algorithm": algorithm}}
        settings = method_class(algorithm).settings_class.from_job(job, 5)
        assert settings.recovery().flip is False, algorithm
        job["method"]["flip"] = True
        assert method_class(algorithm).settings_class.from_job(job, 5).recovery().flip is True, algorithm


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
