"""The service with a run trained on titles and images (`callbacks.matching_eval.text`):
its /match answers against infer.py's matches.csv and the run's own validation F1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from matching.infer import (
    match_embeddings,
    match_postings,
    read_matches,
    run_text,
    run_threshold,
)
from matching.service.app import build_app
from matching.service.loading import load_service
from shared.retrieval.text import has_title, titles_by_id
from shared.run_loading import load_run
from tests.serve.conftest import serve_config
from tests.serve.images import random_png
from tests.tracking.runs import TINY_MATCHING, tiny_run

pytestmark = pytest.mark.slow  # a second tiny run (~10 s on 2 cores) and its service

# Three folds: the validation fold holds several groups, so thresholds are not trivial.
TINY_UNION = [*TINY_MATCHING, "data.n_folds=3", "callbacks.matching_eval.text={mode:union}"]


@pytest.fixture(scope="module")
def union_run(tmp_path_factory):
    """The tiny matching run of the serve tests, trained with the union title rule."""
    return tiny_run(tmp_path_factory, "matching_union", "matching", TINY_UNION)


@pytest.fixture(scope="module")
def val_csv(union_run, tmp_path_factory) -> Path:
    return fold_csv(union_run.run_dir, tmp_path_factory.mktemp("val_fold") / "val.csv")


def fold_csv(run_dir, path: Path) -> Path:
    """The run's validation fold as a postings CSV (absolute image paths, titles, groups):
    the postings its evaluation chose the thresholds on."""
    dm = load_run(run_dir).datamodule
    dm.setup()
    source = dm.source
    row_of = {pid: i for i, pid in enumerate(source.ids)}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["posting_id", "image", "title", "label_group"])
        for r in np.flatnonzero(dm.folds == dm.fold):
            i = row_of[dm.store.ids[r]]
            label = source.class_names[source.labels[i]]
            w.writerow([source.ids[i], str(source.paths[i].resolve()), source.titles[i], label])
    return path


def val_postings(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def served(run_dir, gallery_csv, data_dir: Path):
    return load_service(serve_config(data_dir, f"run_dir={run_dir}", f"gallery={gallery_csv}"))


def answer(client, posting: dict, title: str | None) -> dict:
    data = {} if title is None else {"title": title}
    blob = Path(posting["image"]).read_bytes()
    r = client.post("/match", files=[("files", ("q.png", blob, "image/png"))], data=data)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def results_metric(run_dir, name: str) -> float:
    """A validation metric of the best checkpoint, as the run logged it (metrics.csv)."""
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as f:
        values = [float(r[name]) for r in csv.DictReader(f) if r.get(name)]
    return values[-1]


def row_f1(matches: dict[str, set[str]], label_of: dict[str, str]) -> float:
    f1 = []
    for pid, pred in matches.items():
        truth = {j for j in label_of if label_of[j] == label_of[pid]}
        f1.append(2 * len(pred & truth) / (len(pred) + len(truth)))
    return float(np.mean(f1))


def test_union_matches_are_infers_and_the_evaluations(union_run, val_csv, tmp_path):
    """Each validation posting sent with its image and title: the service's matches are
    matches.csv's of infer.py on the same postings, and their mean F1 is the validation F1
    the run logged for this checkpoint (the threshold pair it chose)."""
    service = served(union_run.run_dir, val_csv, tmp_path)
    rule = service.settings.titles
    assert rule is not None and rule.mode == "union" and rule.text_threshold is not None
    check_served_infer_and_evaluation(union_run.run_dir, service, val_csv, tmp_path)


def check_served_infer_and_evaluation(run_dir, service, val_csv, tmp_path):
    postings = val_postings(val_csv)
    with TestClient(build_app(service.embedder, service.gallery, service.settings)) as c:
        got = {}
        for p in postings:
            result = answer(c, p, p["title"])
            assert result["by_title"] == bool(p["title"].strip())
            got[p["posting_id"]] = {m["posting_id"] for m in result["matches"]}
    out = match_postings(run_dir, val_csv, tmp_path / "matches.csv",
                         store_root=tmp_path / "stores")  # fmt: skip
    assert got == {pid: set(row) for pid, row in read_matches(out).items()}

    results = json.loads((Path(run_dir) / "results.json").read_text())
    logged_f1 = results["optimized_metric"]["val/f1"]
    label_of = {p["posting_id"]: p["label_group"] for p in postings}
    assert row_f1(got, label_of) == pytest.approx(logged_f1, abs=1e-6)
    # The titles matter here: image alone at the image threshold scores otherwise.
    image_f1 = results_metric(run_dir, "val/f1_image")
    assert image_f1 != pytest.approx(logged_f1)


def test_the_runs_own_postings_match_as_infer_matches_them(union_run, tmp_path):
    """The default gallery (the run's postings, titles from its source): each posting sent
    with its image and title gets infer.py's matches of the whole set."""
    service = load_service(serve_config(tmp_path, f"run_dir={union_run.run_dir}"))
    gallery = service.gallery
    postings = gallery.postings()
    run = load_run(union_run.run_dir)
    titles = titles_by_id(run.datamodule.source, [p.posting_id for p in postings])
    assert [p.title for p in postings] == titles and sum(has_title(titles)) > 10
    ids = [p.posting_id for p in postings]
    expected = match_embeddings(
        gallery.embeddings(), ids, run_threshold(run), None, 51, titles, run_text(run)
    )
    with TestClient(build_app(service.embedder, gallery, service.settings)) as c:
        for p, row in zip(postings, expected, strict=True):
            result = answer(c, {"image": p.image}, p.title)
            assert {m["posting_id"] for m in result["matches"]} == set(row), p.posting_id
    gallery.close()


def test_a_query_without_title_gets_the_image_only_answer(union_run, val_csv, tmp_path):
    """No title (absent or blank): the image-only matches, at the image threshold the run
    chose, whatever the gallery's titles."""
    service = served(union_run.run_dir, val_csv, tmp_path)
    gallery = service.gallery
    ids = [p.posting_id for p in gallery.postings()]
    threshold = run_threshold(load_run(union_run.run_dir))
    assert service.settings.threshold == pytest.approx(threshold)
    image_only = match_embeddings(gallery.embeddings(), ids, threshold, None, 51)
    expected = {row[0]: set(row) for row in image_only}
    with TestClient(build_app(service.embedder, gallery, service.settings)) as c:
        for p in val_postings(val_csv)[::3]:
            for title in (None, "  "):
                result = answer(c, p, title)
                assert not result["by_title"]
                assert {m["title_similarity"] for m in result["matches"]} == {None}
                assert {m["posting_id"] for m in result["matches"]} == expected[p["posting_id"]]


def test_added_titles_survive_a_restart(union_run, val_csv, tmp_path):
    """A posting added with a title (POST /gallery, 201) matches a query by that title
    alone after the service is stopped and started again on the same gallery_db."""
    postings = val_postings(val_csv)
    title = next(p["title"] for p in postings if p["title"].strip())
    service = served(union_run.run_dir, val_csv, tmp_path)
    with TestClient(build_app(service.embedder, service.gallery, service.settings)) as c:
        files = [("files", ("new.png", random_png(11), "image/png"))]
        r = c.post("/gallery", files=files, data={"posting_id": "added", "title": title})
        assert r.status_code == 201, r.text
    service.gallery.close()

    again = served(union_run.run_dir, val_csv, tmp_path)
    assert again.gallery.get("added").title == title
    with TestClient(build_app(again.embedder, again.gallery, again.settings)) as c:
        files = [("files", ("q.png", random_png(12), "image/png"))]
        body = c.post("/match", files=files, data={"title": title}).json()
        (result,) = body["results"]
        assert result["by_title"] and body["titles"]["mode"] == "union"
        assert c.get("/health").json()["titles"] == body["titles"]
        assert body["titles"]["text_threshold"] == again.settings.titles.text_threshold
        added = [m for m in result["matches"] if m["posting_id"] == "added"]
        assert added and added[0]["title"] == title
        assert added[0]["title_similarity"] == pytest.approx(1.0, abs=1e-5)
        body = c.post("/match", files=files).json()  # without the title: by image
        assert not body["results"][0]["by_title"]
    again.gallery.close()


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """The tiny run with titles embedded by a tiny random BERT folder (`text.encoder`)."""
    from tests.text_encoders import tiny_bert

    folder = tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")
    text = f"callbacks.matching_eval.text={{mode:sum,weight:0.5,encoder:'{folder}'}}"
    overrides = [*TINY_MATCHING, "data.n_folds=3", text]
    return tiny_run(tmp_path_factory, "matching_encoder", "matching", overrides), folder


def test_with_a_title_encoder_serve_and_infer_give_the_evaluations_matches(encoder_run, tmp_path):
    """A run whose titles a local model folder embeds: the service and infer.py match the
    validation fold as its evaluation did; once the folder changes, both refuse it."""
    run, folder = encoder_run
    state = next(
        s["title_embedder"] for k, s in load_run(run.run_dir).callbacks_state.items()
        if k.startswith("MatchingEvalCallback")
    )  # fmt: skip
    assert state["kind"] == "encoder" and state["path"] == str(folder.resolve())
    val = fold_csv(run.run_dir, tmp_path / "val.csv")
    service = served(run.run_dir, val, tmp_path / "serve")
    assert service.settings.titles.mode == "sum"
    check_served_infer_and_evaluation(run.run_dir, service, val, tmp_path)
    service.gallery.close()

    (folder / "vocab.txt").write_text((folder / "vocab.txt").read_text() + "extra\n")
    with pytest.raises(ValueError, match=f"encoder='{folder.resolve()}'.*changed"):
        match_postings(run.run_dir, val, tmp_path / "again.csv", store_root=tmp_path / "s")
    with pytest.raises(ValueError, match=f"encoder='{folder.resolve()}'.*changed"):
        served(run.run_dir, val, tmp_path / "serve2")
