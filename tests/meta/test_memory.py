"""The task memory of BiDf-MKD / TACO: ring buffers, replay-task sampling, exact resume."""

from __future__ import annotations

import itertools

import pytest
import torch

from dfml.checkpoint import load_checkpoint, save_checkpoint
from dfml.meta.memory import SPLITS, TaskMemory

SHAPE = (1, 2, 2)


def filled(n: int, value: float) -> torch.Tensor:
    return torch.full((n, *SHAPE), float(value))


def constant_memory(num_classes: int, per_split: int = 6, max_batches: int = 3) -> TaskMemory:
    """Class ``c{i}`` holds images all equal to ``i`` in both splits, in two batches each."""
    memory = TaskMemory(max_batches)
    for i in range(num_classes):
        for split in SPLITS:
            memory.add(f"c{i}", split, filled(per_split // 2, i))
            memory.add(f"c{i}", split, filled(per_split - per_split // 2, i))
    return memory


def assert_tasks_equal(a, b) -> None:
    (task_a, names_a), (task_b, names_b) = a, b
    assert names_a == names_b
    for x, y in zip((task_a.support_x, task_a.support_y, task_a.query_x, task_a.query_y),
                    (task_b.support_x, task_b.support_y, task_b.query_x, task_b.query_y)):
        assert torch.equal(x, y)


def test_ring_buffer_keeps_the_newest_batches_in_order():
    memory = TaskMemory(max_batches=2)
    batches = [torch.randn(2, *SHAPE) for _ in range(3)]
    for batch in batches:
        memory.add("a", "support", batch)
    assert memory.batches("a", "support") == 2
    assert torch.equal(memory.images("a", "support"), torch.cat(batches[1:]))
    fourth = torch.randn(1, *SHAPE)
    memory.add("a", "support", fourth)
    assert torch.equal(memory.images("a", "support"), torch.cat([batches[2], fourth]))
    assert memory.num_images() == 3


def test_add_stores_a_detached_copy():
    images = torch.zeros(2, *SHAPE, requires_grad=True)
    memory = TaskMemory(1)
    memory.add("a", "query", images)
    with torch.no_grad():
        images.add_(1.0)
    stored = memory.images("a", "query")
    assert not stored.requires_grad and torch.equal(stored, torch.zeros(2, *SHAPE))


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="max_batches must be >= 1"):
        TaskMemory(0)
    memory = TaskMemory(2)
    with pytest.raises(ValueError, match=r"split must be one of \('support', 'query'\), got 'train'"):
        memory.add("a", "train", filled(1, 0))
    memory.add("a", "support", filled(1, 0))
    with pytest.raises(ValueError, match=r"image shape \(3, 2, 2\) differs from .* \(1, 2, 2\)"):
        memory.add("b", "support", torch.zeros(1, 3, 2, 2))
    memory.add("a", "query", filled(1, 0))
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="2-way task needs 2 classes .* the memory has 1"):
        memory.sample_task(2, 1, 1, generator)
    with pytest.raises(ValueError, match="class 'a' has 1 support images, the task needs 2"):
        memory.sample_task(1, 2, 1, generator)
    with pytest.raises(ValueError, match="class 'a' has 1 query images, the task needs 3"):
        memory.sample_task(1, 1, 3, generator)


def test_labels_align_by_construction():
    memory = constant_memory(5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        task, names = memory.sample_task(way=3, shot=2, query=3, generator=generator)
        assert len(set(names)) == 3 and task.n_way == 3
        assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2]
        assert task.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        for images, labels in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
            for image, label in zip(images, labels):
                class_id = int(names[int(label)][1:])
                assert torch.equal(image, torch.full(SHAPE, float(class_id)))


def test_classes_in_one_split_only_are_not_replayable():
    memory = constant_memory(2)
    memory.add("only_support", "support", filled(4, 7))
    memory.add("only_query", "query", filled(4, 8))
    assert memory.classes() == ["c0", "c1"] and len(memory) == 2
    assert memory.classes("support") == ["c0", "c1", "only_support"]
    assert memory.classes("query") == ["c0", "c1", "only_query"]
    generator = torch.Generator().manual_seed(2)
    for _ in range(30):
        _, names = memory.sample_task(2, 1, 1, generator)
        assert sorted(names) == ["c0", "c1"]


def test_replay_tasks_mix_classes_of_different_members():
    memory = TaskMemory(2)
    names = ["m0/a", "m0/b", "m1/a", "m1/b"]
    for name in names:
        for split in SPLITS:
            memory.add(name, split, filled(2, 0))
    generator = torch.Generator().manual_seed(3)
    seen = {frozenset(memory.sample_task(2, 1, 1, generator)[1]) for _ in range(200)}
    assert seen == {frozenset(pair) for pair in itertools.combinations(names, 2)}


def test_draws_within_a_task_are_without_replacement():
    memory = TaskMemory(1)
    for name in ("a", "b"):
        for split in SPLITS:
            memory.add(name, split, torch.randn(4, *SHAPE))
    generator = torch.Generator().manual_seed(4)
    for _ in range(20):
        task, names = memory.sample_task(2, 4, 4, generator)
        for label, name in enumerate(names):
            for split, images, labels in (("support", task.support_x, task.support_y),
                                          ("query", task.query_x, task.query_y)):
                drawn = images[labels == label].flatten(1)
                stored = memory.images(name, split).flatten(1)
                assert sorted(map(tuple, drawn.tolist())) == sorted(map(tuple, stored.tolist()))


def test_sampling_uses_only_the_passed_generator():
    memory = constant_memory(4)
    torch.manual_seed(0)
    first = memory.sample_task(2, 2, 2, torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    torch.rand(7)
    second = memory.sample_task(2, 2, 2, torch.Generator().manual_seed(5))
    assert_tasks_equal(first, second)


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    def fill(memory: TaskMemory) -> None:
        for step in range(3):  # 3 batches into a ring of 2: the ring has wrapped once
            for i, name in enumerate(["m0/a", "m0/b", "m1/a"]):
                for split in SPLITS:
                    memory.add(name, split, torch.randn(3, *SHAPE, generator=data) + i)
        memory.add("m1/b", "support", torch.randn(3, *SHAPE, generator=data))  # not yet replayable

    data = torch.Generator().manual_seed(6)
    reference = TaskMemory(2)
    fill(reference)
    data = torch.Generator().manual_seed(6)
    resumed_source = TaskMemory(2)
    fill(resumed_source)

    draws_ref, draws_res = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert_tasks_equal(reference.sample_task(3, 2, 2, draws_ref), resumed_source.sample_task(3, 2, 2, draws_res))

    path = tmp_path / "memory.safetensors"
    save_checkpoint(path, {"memory": resumed_source.state_dict(), "rng": draws_res.get_state()})
    state = load_checkpoint(path)
    resumed = TaskMemory(5)
    resumed.load_state_dict(state["memory"])
    draws_res = torch.Generator()
    draws_res.set_state(state["rng"])
    assert resumed.max_batches == 2 and resumed.classes() == reference.classes()
    assert resumed.classes("support") == reference.classes("support")

    for memory in (reference, resumed):  # wrap every ring once more, and complete m1/b
        for name in ["m0/a", "m0/b", "m1/a", "m1/b"]:
            for split in SPLITS:
                memory.add(name, split, torch.full((2, *SHAPE), float(len(name) + len(split))))
    for name in reference.classes():
        for split in SPLITS:
            assert torch.equal(reference.images(name, split), resumed.images(name, split))
    assert reference.num_images() == resumed.num_images()
    for _ in range(5):
        assert_tasks_equal(reference.sample_task(4, 2, 1, draws_ref), resumed.sample_task(4, 2, 1, draws_res))


def test_add_recovered_splits_by_label():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, *SHAPE).clone()
    labels = torch.tensor([1, 0, 1, 2, 0, 1])
    memory = TaskMemory(2)
    memory.add_recovered(images, labels, ["x", "y", "z"], "support")
    assert memory.classes("support") == ["x", "y", "z"]
    assert torch.equal(memory.images("x", "support"), images[[1, 4]])
    assert torch.equal(memory.images("y", "support"), images[[0, 2, 5]])
    assert torch.equal(memory.images("z", "support"), images[[3]])
    assert all(memory.batches(name, "support") == 1 for name in "xyz")
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        memory.add_recovered(images, labels, ["x", "y"], "query")
    with pytest.raises(ValueError, match="need one label per image: 6 images"):
        memory.add_recovered(images, labels[:5], ["x", "y", "z"], "query")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_sample_task_moves_to_device(device):
    memory = constant_memory(2)
    task, names = memory.sample_task(2, 1, 1, torch.Generator().manual_seed(8), device=device)
    tensors = (task.support_x, task.support_y, task.query_x, task.query_y)
    assert all(t.device.type == device for t in tensors)
    assert memory.images(names[0], "support").device.type == "cpu"  # the memory itself stays put
