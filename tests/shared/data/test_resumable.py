"""Train loaders that continue a pass from a saved position: the same order as the samplers
they stand for (torch's RandomSampler, DistributedSampler), and after a state round trip
exactly the batches the interrupted pass had left."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from shared.data.resumable import ResumableDistributedSampler, ResumableLoader, ShuffleSampler
from shared.data.samplers import MPerClassSampler

N, BATCH = 50, 4


def batches(loader, n=None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch.tolist())
        if n is not None and len(out) == n:
            break
    return out


def test_shuffle_sampler_is_random_samplers_order_from_the_same_draw():
    torch.manual_seed(3)
    ours = [list(ShuffleSampler(range(N))) for _ in range(3)]
    after_ours = torch.rand(1)
    torch.manual_seed(3)
    torch_order = [list(RandomSampler(range(N))) for _ in range(3)]
    assert ours == torch_order and torch.equal(after_ours, torch.rand(1))


def test_distributed_sampler_is_torchs():
    for rank in (0, 1):
        kwargs = dict(num_replicas=2, rank=rank, shuffle=True, seed=7)
        ours, theirs = (
            ResumableDistributedSampler(range(N), **kwargs),
            DistributedSampler(range(N), **kwargs),
        )
        for epoch in (0, 3):
            ours.set_epoch(epoch), theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)


def samplers():
    labels = np.repeat(np.arange(10), 5)
    return {
        "shuffle": lambda: ShuffleSampler(range(N)),
        "distributed": lambda: ResumableDistributedSampler(
            range(N), num_replicas=2, rank=1, shuffle=True, seed=5
        ),
        "m_per_class": lambda: MPerClassSampler(labels, 2, BATCH, seed=5, num_replicas=1, rank=0),
    }


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["shuffle", "distributed", "m_per_class"])
def test_a_loaded_state_continues_the_interrupted_pass(kind, workers):
    make = samplers()[kind]

    def loader():
        return ResumableLoader(range(N), batch_size=BATCH, sampler=make(), num_workers=workers)

    torch.manual_seed(0)
    first = loader()
    if hasattr(first.sampler, "set_epoch"):
        first.sampler.set_epoch(2)
    whole = batches(first)  # the uninterrupted pass
    torch.manual_seed(0)
    interrupted = loader()
    if hasattr(interrupted.sampler, "set_epoch"):
        interrupted.sampler.set_epoch(2)
    done = batches(interrupted, 3)
    state = interrupted.state_dict()
    assert done == whole[:3] and state["batches"] == 3

    torch.manual_seed(99)  # another process, other generator states, epoch not yet set
    resumed = loader()
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert rest == whole[3:]
    assert resumed.served == len(whole)
    assert len(batches(resumed)) == len(whole)  # the next pass is whole again


def test_a_state_that_arrives_after_the_iterator_was_made_remakes_it_without_drawing():
    """Lightning may make the iterator before the checkpoint is read (see ResumableLoader)."""
    torch.manual_seed(0)
    whole = batches(ResumableLoader(range(N), batch_size=BATCH, sampler=ShuffleSampler(range(N))))
    torch.manual_seed(0)
    interrupted = ResumableLoader(range(N), batch_size=BATCH, sampler=ShuffleSampler(range(N)))
    batches(interrupted, 2)
    state = interrupted.state_dict()

    resumed = ResumableLoader(range(N), batch_size=BATCH, sampler=ShuffleSampler(range(N)))
    iterator = iter(resumed)  # made before the state arrives
    resumed.load_state_dict(state)
    generator = torch.get_rng_state()
    rest = [b.tolist() for b in iterator]
    assert rest == whole[2:]
    assert torch.equal(torch.get_rng_state(), generator)  # the remade iterator drew nothing


def test_a_sampler_without_a_position_says_the_epoch_starts_over(caplog):
    loader = ResumableLoader(range(N), batch_size=BATCH, sampler=RandomSampler(range(N)))
    loader.load_state_dict({"batches": 3})
    assert "starts over in a new order" in caplog.text
    assert len(batches(loader)) == len(DataLoader(range(N), batch_size=BATCH))
