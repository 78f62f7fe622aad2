"""A train loader that can stop inside an epoch and carry on where it stopped.

Lightning puts the `state_dict()` of every train loader that has one into each checkpoint, and
hands it back (`load_state_dict`) before the first batch of a run resumed mid-epoch. Here that
state is what fixes the epoch's order (the shuffle's seed, or the epoch of a seed + epoch
sampler) and how many batches were handed out, so a run saved mid-epoch (a SLURM preemption,
`shared.callbacks.preemption`) resumes with the rest of the same epoch: no image is seen twice
or skipped. With the generators restored as well (`RNGStateCallback`), the resumed run trains
bit for bit like the uninterrupted one wherever augmentation draws in the main process (on the
device, the default, or in the loader with `num_workers=0`); loader workers that augment get
per-worker seeds that a resume deals out afresh.
"""

from __future__ import annotations

import logging
from itertools import islice

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

log = logging.getLogger(__name__)


class ShuffleSampler(RandomSampler):
    """`RandomSampler`'s order, from the same one draw of torch's global generator per pass (a
    plain `shuffle=True` run is unchanged), keeping that seed so a pass can be replayed."""

    def __init__(self, data_source) -> None:
        super().__init__(data_source)
        self.seed: int | None = None
        self._replay: tuple[int, int] | None = None

    def __iter__(self):
        seed, start = self._replay or (None, 0)
        self._replay = None
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator)[start:].tolist()

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def resume(self, state: dict, start: int) -> None:
        """The next pass: the order of the pass `state` was taken in, from position `start`."""
        self._replay = (state["seed"], start)


class EpochResumable:
    """For `DistributedSampler`s, whose order is a function of (seed, epoch): the next pass
    can start at the epoch of a saved state, from a given position."""

    _start = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def resume(self, state: dict, start: int) -> None:
        # set here too: with loader workers the first indices are drawn when the iterator is
        # made, before Lightning's `set_epoch` of the resumed epoch
        self.set_epoch(state["epoch"])
        self._start = start

    def _from_start(self, order):
        start, self._start = self._start, 0
        return islice(order, start, None)


class ResumableDistributedSampler(EpochResumable, DistributedSampler):
    """The `DistributedSampler` Lightning would put in a DDP train loader (shuffled, same
    seed), able to start a pass part-way through."""

    def __iter__(self):
        return self._from_start(super().__iter__())


class ResumableLoader(DataLoader):
    """A `DataLoader` whose position in the current pass is saved with each checkpoint.

    The state is the sampler's (what fixes the pass's order) and the number of batches handed
    out: read at the end of a training step, that is the number of steps taken in the epoch
    (Lightning fetches no batch ahead from a loader with a length).

    Lightning restores loader states before it makes the epoch's iterator, except when the
    module asked for `estimated_stepping_batches` in `configure_optimizers` (ours do): then the
    iterator exists before the checkpoint is read, and `LoaderPositionCallback` hands the state
    over when training starts. A state that arrives after the iterator was made but before its
    first batch remakes the iterator, without drawing from the global generators.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0
        self._start: int | None = None  # a pass to start part-way (a loaded state)

    def __iter__(self):
        self.served, self._start = self._start or 0, None
        return _Counting(self, super().__iter__())

    def _remade_iterator(self):
        """The pass from the loaded state, replacing an iterator made before it arrived."""
        with torch.random.fork_rng(devices=[]):  # making an iterator draws a worker seed
            return iter(self)

    @property
    def resumable(self) -> bool:
        return hasattr(self.sampler, "resume") and self.batch_size is not None

    def state_dict(self) -> dict:
        state = {"batches": self.served}
        if self.resumable:
            state["order"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state.get("order") or not self.resumable:
            log.warning(
                "This train loader cannot continue a pass (sampler %s): the interrupted epoch "
                "starts over in a new order",
                type(self.sampler).__name__,
            )
            return
        self.sampler.resume(state["order"], state["batches"] * self.batch_size)
        self._start = state["batches"]


class _Counting:
    """The loader's iterator, counting the batches it hands out into `loader.served`."""

    def __init__(self, loader: ResumableLoader, iterator) -> None:
        self.loader, self.iterator = loader, iterator

    def __iter__(self):
        return self

    def __next__(self):
        if self.loader._start is not None and not self.loader.served:
            self.iterator = self.loader._remade_iterator().iterator
        batch = next(self.iterator)
        self.loader.served += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)
