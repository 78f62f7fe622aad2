"""Inference applies the run's title combination exactly as the evaluation scored it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from matching.infer import match_embeddings, run_text
from shared.callbacks.matching_eval import MatchingEvalCallback
from shared.run_loading import CHOSEN

WORDS = "acme zorq bottle jar tin red blue green promo ori murah kettle mug".split()


def _postings(n=60, groups=15, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(groups, size=n)
    centres = rng.normal(size=(groups, 16))
    emb = centres[labels] + 1.1 * rng.normal(size=(n, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    titles = [
        "" if i % 6 == 2 else " ".join([WORDS[labels[i] % 13], WORDS[(labels[i] * 5) % 13],
                                        str(rng.choice(WORDS)), f"x{i % 9}"])
        for i in range(n)
    ]  # fmt: skip
    return emb, labels, titles


def _row_f1(matches, ids, labels):
    label_of = dict(zip(ids, labels, strict=True))
    f1 = []
    for pid, row in zip(ids, matches, strict=True):
        truth = {j for j in ids if label_of[j] == label_of[pid]}
        pred = set(row)
        f1.append(2 * len(pred & truth) / (len(pred) + len(truth)))
    return float(np.mean(f1))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from tests.text_encoders import tiny_bert

    return str(tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model"))


@pytest.mark.parametrize("mode", ["union", "sum", "concat"])
def test_infer_matches_are_the_evaluations(mode):
    _check_infer_matches_the_evaluation({"mode": mode, "weight": 0.6})


@pytest.mark.slow  # imports transformers (~8 s on 2 cores)
@pytest.mark.parametrize("mode", ["union", "sum", "concat"])
def test_with_a_title_encoder_infer_matches_are_the_evaluations(mode, encoder_dir):
    """The same with titles embedded by a local model folder (`text.encoder`)."""
    _check_infer_matches_the_evaluation({"mode": mode, "weight": 0.6, "encoder": encoder_dir})


def _check_infer_matches_the_evaluation(text: dict):
    emb, labels, titles = _postings()
    n = len(labels)
    ids = [f"p{i}" for i in range(n)]
    train, val = np.arange(0, n, 2), np.arange(1, n, 2)  # fit on train titles, score val
    dm = SimpleNamespace(
        source=SimpleNamespace(ids=ids, titles=titles),
        store=SimpleNamespace(ids=ids),
        train_indices=train,
    )
    trainer = SimpleNamespace(
        datamodule=dm, testing=False, sanity_checking=False, is_global_zero=True
    )
    callback = MatchingEvalCallback(k=11, text=text)
    fold = {
        "embeddings": torch.from_numpy(emb[val]),
        "labels": torch.from_numpy(labels[val]),
        "index": torch.from_numpy(val),
    }
    metrics = callback.evaluate({"fold": fold}, trainer)
    assert {"f1_image", "f1_text", "f1"} <= set(metrics)

    checkpoint = {}
    callback.on_save_checkpoint(trainer, None, checkpoint)
    run = SimpleNamespace(
        chosen=checkpoint[CHOSEN],
        callbacks_state={"MatchingEvalCallback{}": callback.state_dict()},
        checkpoint="ckpt",
    )
    val_ids = [ids[i] for i in val]
    matches = match_embeddings(
        emb[val], val_ids, run.chosen["threshold"], None, 11, [titles[i] for i in val],
        run_text(run),
    )  # fmt: skip
    assert _row_f1(matches, val_ids, labels[val]) == pytest.approx(metrics["f1"], abs=1e-9)
    # Postings without a title: image-only matching at the image threshold when none has one.
    image_only = match_embeddings(
        emb[val], val_ids, run.chosen["threshold"], None, 11, [""] * len(val), run_text(run)
    )
    assert _row_f1(image_only, val_ids, labels[val]) == pytest.approx(metrics["f1_image"])
