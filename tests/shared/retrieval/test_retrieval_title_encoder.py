"""Title embeddings from a local model folder: each title's mean token state, one title at a
time and written out here, equals the batched, padded embedder's row; a folder that is gone,
not a model or changed since the run is refused, naming the key and the path.

Loading a model imports transformers (~8 s on 2 cores): those tests are marked slow; the
checks made before any import run by default."""

import json
import sys

import numpy as np
import pytest
import torch

from shared.retrieval.text import embedder_from_state, title_embedder
from shared.retrieval.title_encoder import KEY, TitleEncoder
from tests.text_encoders import tiny_bert

slow = pytest.mark.slow  # imports transformers and loads the tiny model

TITLES = ["Acme striped bottle 500ml", "", "zorq jar", None, "ACME striped bottle 500ML", "x", " "]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")


def _reference(model_dir, title: str) -> np.ndarray:
    """One title alone (no padding): the mean of its token states, unit length."""
    from transformers import BertModel, BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = BertModel.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        states = model(**tokenizer(title, return_tensors="pt")).last_hidden_state[0]
    mean = states.sum(0) / states.shape[0]
    return (mean / mean.norm()).numpy()


@slow
def test_rows_are_the_mean_token_state_of_each_title(model_dir):
    enc = TitleEncoder(model_dir, batch_size=3)  # batches of titles of unequal length
    x = enc.transform(TITLES)
    assert x.dtype == np.float32 and x.shape == (len(TITLES), 32)
    for i, title in enumerate(TITLES):
        if title and title.strip():
            np.testing.assert_allclose(x[i], _reference(model_dir, title), atol=1e-5)
        else:  # no title: a zero row, as TF-IDF gives
            assert not x[i].any()
    assert x[0] @ x[4] == pytest.approx(1.0, abs=1e-5)  # lowercased: the same title


@slow
def test_the_state_names_the_folder_and_rebuilds_the_same_rows(model_dir):
    enc = title_embedder(str(model_dir), train_titles=["ignored: nothing is fitted"])
    state = enc.state_dict()
    assert state["kind"] == "encoder" and state["path"] == str(model_dir.resolve())
    assert json.loads(json.dumps(state)) == state  # plain values only
    again = embedder_from_state(state)
    np.testing.assert_array_equal(again.transform(TITLES), enc.transform(TITLES))


@slow
def test_a_changed_folder_is_refused(tmp_path):
    copy = tiny_bert(tmp_path / "model")
    state = TitleEncoder(copy).state_dict()
    saved = (copy / "config.json").read_text()
    (copy / "config.json").write_text(json.dumps({**json.loads(saved), "layer_norm_eps": 1e-6}))
    with pytest.raises(ValueError, match=f"{KEY}='{copy}'.*changed"):
        embedder_from_state(state)
    tiny_bert(copy, seed=1)  # the same config and vocabulary, other weights
    assert (copy / "config.json").read_text() == saved
    with pytest.raises(ValueError, match=f"{KEY}='{copy}'.*changed"):
        embedder_from_state(state)
    tiny_bert(copy, seed=0)  # restored: accepted again
    assert embedder_from_state(state).state_dict() == state


def test_a_missing_folder_or_not_a_model_is_refused(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(FileNotFoundError, match=f"{KEY}='{gone}': no such folder"):
        title_embedder(str(gone), [])
    state = {"kind": "encoder", "path": str(gone), "sha256": "0" * 64}
    with pytest.raises(FileNotFoundError, match=str(gone)):
        embedder_from_state(state)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a model")
    with pytest.raises(ValueError, match=f"{KEY}='{tmp_path / 'notes'}' is not a Hugging"):
        title_embedder(str(tmp_path / "notes"), [])


@slow
def test_a_folder_with_a_config_but_no_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # no model_type, no weights
    with pytest.raises(ValueError, match=f"{KEY}='{tmp_path}': not a loadable"):
        title_embedder(str(tmp_path), [])


@slow
def test_remote_code_in_the_folder_never_runs(model_dir, tmp_path):
    """A config pointing AutoModel at the folder's own Python: refused or ignored, never run."""
    copy = tiny_bert(tmp_path / "model")
    marker = tmp_path / "ran"
    (copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModel": "evil.Model"}
    (copy / "config.json").write_text(json.dumps(config))
    try:
        TitleEncoder(copy).transform(["acme"])
    except ValueError:
        pass
    assert not marker.exists()


def test_without_transformers_the_error_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ImportError, match=f"{KEY} is set.*pip install transformers"):
        TitleEncoder(tmp_path)
