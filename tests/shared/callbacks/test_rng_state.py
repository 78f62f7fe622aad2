"""RNG states travel with the checkpoint (weights_only) and restore the exact same draws."""

import random

import numpy as np
import torch

from shared.callbacks.rng_state import RNGStateCallback


def draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in "abc"])


def test_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = RNGStateCallback().state_dict()
    torch.save({"callbacks": {"RNGStateCallback": saved}}, tmp_path / "last.ckpt")
    expected = draws()
    draws()  # the generators move on

    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    callback = RNGStateCallback()
    callback.load_state_dict(loaded["RNGStateCallback"])
    assert draws() != expected  # not restored at load time (Lightning draws after loading) ...
    callback.on_train_epoch_start(None, None)  # ... but when the next epoch starts
    assert draws() == expected
    callback.on_train_epoch_start(None, None)  # restored once only
    assert draws() != expected
