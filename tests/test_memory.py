import pytest
import torch

from lrra.memory import ReplayMemory


def push_numbered(memory, count, size=2):
    for i in range(count):
        memory.push(torch.full((size, 1, 4, 4), float(i)))


def stored_ids(memory):
    return [int(b[0, 0, 0, 0]) for b in memory.state_dict()["batches"]]


def test_fifo_evicts_the_oldest_push_at_capacity():
    memory = ReplayMemory(3)
    push_numbered(memory, 5)
    assert len(memory) == 3 and memory.num_images == 6
    assert stored_ids(memory) == [2, 3, 4]


def test_capacity_zero_stores_nothing():
    memory = ReplayMemory(0)
    push_numbered(memory, 3)
    assert len(memory) == 0
    with pytest.raises(RuntimeError, match="empty"):
        memory.sample(1)


def test_push_copies_and_detaches():
    memory = ReplayMemory(2)
    images = torch.zeros(2, 1, 4, 4, requires_grad=True)
    memory.push(images)
    with torch.no_grad():
        images += 1
    sample = memory.sample(1)
    assert not sample.requires_grad and sample.sum() == 0


def test_sample_is_reproducible_from_the_generator_state():
    memory = ReplayMemory(4)
    push_numbered(memory, 4)
    rng = torch.Generator().manual_seed(3)
    first = memory.sample(2, rng)
    rng.manual_seed(3)
    assert torch.equal(first, memory.sample(2, rng))
    assert first.shape == (4, 1, 4, 4)


def test_state_round_trip_keeps_order_and_contents(tmp_path):
    memory = ReplayMemory(3)
    push_numbered(memory, 4)
    torch.save(memory.state_dict(), tmp_path / "memory.pt")
    restored = ReplayMemory(3)
    restored.load_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
    assert stored_ids(restored) == [1, 2, 3]
    push_numbered(restored, 1)  # still FIFO with the same capacity after loading
    assert stored_ids(restored) == [2, 3, 0]


def test_state_with_another_capacity_is_refused():
    memory = ReplayMemory(3)
    with pytest.raises(ValueError, match="capacity"):
        memory.load_state_dict(ReplayMemory(2).state_dict())
    with pytest.raises(ValueError, match=">= 0"):
        ReplayMemory(-1)


def test_sample_images_draws_single_images_across_pushes():
    memory = ReplayMemory(4)
    push_numbered(memory, 4, size=2)
    rng = torch.Generator().manual_seed(0)
    sample = memory.sample_images(40, rng)
    assert sample.shape == (40, 1, 4, 4)
    assert {int(v) for v in sample[:, 0, 0, 0]} == {0, 1, 2, 3}  # 40 draws from 8 images reach every push
    rng.manual_seed(0)
    assert torch.equal(sample, memory.sample_images(40, rng))
    with pytest.raises(RuntimeError, match="empty"):
        ReplayMemory(2).sample_images(1)
