"""conf/serve.yaml -> the embedder, the gallery and the settings the app is built from.

The model is a product-matching run (`run_dir`, default: the newest run under `runs_root`)
or, with `onnx=...`, its ONNX export. The run also gives the defaults: the threshold its
evaluation chose (stored in the checkpoint), its min2 rule, and the gallery (the postings it
was trained on, e.g. the synthetic products).

The gallery lives in `gallery_db` (SQLite, see `matching.service.gallery`): the configured
postings are embedded into it once, POST /gallery appends to it, and later starts read it
back instead of embedding anything. It is tied to the weights by their content hash: a
database of other weights is refused (or re-embedded from its images with `reembed=true`).

A run trained with a title combination (`callbacks.matching_eval.text`) brings its rule and
title embedder (`matching.service.titles`); the postings' titles are already stored in
`gallery_db` (and come from the run's source or the gallery CSV's `title` column).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from matching.infer import run_background, run_threshold
from matching.service.app import IMAGES_SUBDIR, Settings
from matching.service.embedder import Embedder, OnnxEmbedder, TorchEmbedder
from matching.service.gallery import (
    SCHEMA_VERSION,
    DuplicatePostingError,
    Gallery,
    GalleryStore,
    Posting,
)
from matching.service.titles import run_titles
from shared.data.sources import DEFAULT_BACKGROUND
from shared.retrieval.search import l2_normalize
from shared.retrieval.text import TitleEmbedder

log = logging.getLogger(__name__)


@dataclass
class Service:
    embedder: Embedder
    gallery: Gallery
    settings: Settings


def newest_run(runs_root: str | Path) -> Path:
    """The newest run directory (names are timestamps) under `runs_root` with a config and
    a checkpoint; FileNotFoundError saying how to train one."""
    from shared.run_loading import newest_run as newest

    root = Path(runs_root)
    run = newest(root)
    if run is None:
        raise FileNotFoundError(
            f"no trained product-matching run under runs_root={str(root)!r}. Train one first "
            "with `python product-matching/run.py` (a quick one: `python "
            "product-matching/run.py trainer.max_epochs=1 trainer.check_val_every_n_epoch=1`), "
            "or pass run_dir=<a run directory>, or onnx=<model.onnx> with threshold= and "
            "gallery=."
        )
    return run


def service_background(cfg: DictConfig, run) -> tuple[int, int, int]:
    """`background`, or the run's `data.source.background` when null. A value that differs from the
    run's is refused when the gallery is the run's own postings: their store was decoded on
    the run's, and an uploaded copy of a gallery image must get the store's pixels."""
    from shared.data.sources import DEFAULT_BACKGROUND, check_background

    own = run_background(run.config) if run is not None else DEFAULT_BACKGROUND
    if cfg.background is None:
        return own
    value = check_background(cfg.background, "background")
    if run is not None and not cfg.gallery and value != own:
        raise ValueError(
            f"background={list(value)} differs from data.source.background={list(own)} of the run "
            f"{run.run_dir}, whose postings are the gallery: leave background=null, or give "
            "gallery=<postings CSV>"
        )
    return value


def gallery_postings(cfg: DictConfig, run, image_size: int, store_root: Path, background):
    """(uint8 images [N, 3, S, S], postings, a key that changes with them): the CSV
    `gallery` (transparency composited on `background`), or the run's own postings."""
    from shared.data.sources import CsvSource
    from shared.data.store import build_store

    if cfg.gallery:
        source = CsvSource(
            str(cfg.gallery),
            cfg.gallery_image_dir,
            label_col=None,
            id_col="posting_id",
            background=background,
        )
        store = build_store(source, store_root, image_size, name="gallery")
    elif run is not None:
        datamodule = run.datamodule  # the run's postings (synthetic ones written as CSV + PNG)
        datamodule.setup()
        source, store = datamodule.source, datamodule.store
        if not hasattr(source, "frame"):
            raise ValueError(
                f"the run's data source ({type(source).__name__}) has no postings to serve: "
                "give gallery=<postings CSV>"
            )
    else:
        raise ValueError("gallery=<postings CSV> is needed when no run is given")
    frame = source.frame.reset_index(drop=True)
    rows = {pid: i for i, pid in enumerate(source.ids)}

    def column(name: str, i: int) -> str | None:
        return str(frame.at[i, name]) if name in frame.columns else None

    postings = []
    for pid in store.ids:
        i = rows[pid]
        postings.append(
            Posting(
                pid, column("label_group", i), column("title", i), str(source.paths[i].resolve())
            )
        )
    blob = json.dumps([store.meta["key"], [asdict(p) for p in postings]]).encode()
    return store.images, postings, hashlib.sha256(blob).hexdigest()


def load_service(cfg: DictConfig) -> Service:
    """Everything `build_app` needs, from the serve config; errors name the key to fix."""
    return build_service(cfg, *load_model(cfg))


def load_model(cfg: DictConfig) -> tuple[Embedder, object | None]:
    """(embedder, the run or None): `run_dir`, else the newest run, else `onnx` alone."""
    from shared.run_loading import load_run

    run = None
    if cfg.run_dir:
        run = load_run(cfg.run_dir, cfg.which)
    elif not (cfg.onnx and cfg.gallery and cfg.threshold is not None):
        run = load_run(newest_run(cfg.runs_root), cfg.which)
    if run is not None:
        log.info("Model: %s", run.checkpoint)

    if cfg.onnx:
        embedder: Embedder = OnnxEmbedder(cfg.onnx)
        if run is not None and int(run.config.data.image_size) != embedder.image_size:
            raise ValueError(
                f"onnx={cfg.onnx!r} takes {embedder.image_size} px images but the run "
                f"{run.run_dir} was trained at data.image_size={run.config.data.image_size}"
            )
    else:
        backbone = OmegaConf.select(run.config, "backbone.name", default="?")
        embedder = TorchEmbedder(
            run.module,
            int(run.config.data.image_size),
            # the run's name, not its path: /health must not map the server's disk
            f"{type(run.module.net).__name__} {backbone}, run {Path(run.run_dir).name} "
            f"{Path(run.checkpoint).name}",
        )
    return embedder, run


def build_service(cfg: DictConfig, embedder: Embedder, run=None) -> Service:
    """The gallery embedded by `embedder` and the settings, defaults taken from `run`."""
    threshold = cfg.threshold
    if threshold is None:
        if run is None:
            raise ValueError("threshold=<similarity> is needed when no run is given")
        threshold = run_threshold(run)
        if threshold is None:
            raise ValueError(
                f"{run.checkpoint} stores no threshold (no matching evaluation ran before it "
                "was saved): pass threshold=<similarity>"
            )
    min2 = cfg.min2
    evaluation = OmegaConf.select(run.config, "callbacks.matching_eval") if run else None
    if min2 is None and evaluation is not None:
        min2 = evaluation.get("min2")
    if evaluation is not None and evaluation.get("blend_k"):
        log.warning(
            "The run chose its threshold on neighbourhood-blended embeddings (blend_k=%s); "
            "the service matches plain embeddings, so the threshold may need tuning.",
            evaluation.blend_k,
        )

    background = service_background(cfg, run)
    titles = run_titles(run, cfg.threshold) if run is not None else None
    rule, title_embedder = titles if titles is not None else (None, None)
    if rule is not None:
        log.info(
            "Titles: the run's %s rule, threshold %.3f, title threshold %s (queries without "
            "a title: image only at %.3f)",
            rule.mode,
            rule.threshold,
            rule.text_threshold,
            float(threshold),
        )
    data_dir = Path(cfg.data_dir)
    gallery = open_gallery(cfg, embedder, run, data_dir, background, title_embedder)
    settings = Settings(
        threshold=float(threshold),
        min2=None if min2 is None else float(min2),
        top_k=int(cfg.top_k),
        max_top_k=int(cfg.max_top_k),
        max_upload_mb=float(cfg.max_upload_mb),
        max_files=int(cfg.max_files),
        max_pixels=int(cfg.max_pixels),
        max_request_pixels=int(cfg.max_request_pixels),
        data_dir=data_dir,
        allowed_hosts=(*cfg.allowed_hosts, *([] if cfg.host in ("0.0.0.0", "::") else [cfg.host])),
        background=background,
        max_decodes=int(cfg.max_decodes),
        queue_timeout_s=float(cfg.queue_timeout_s),
        body_timeout_s=float(cfg.body_timeout_s),
        batch_window_ms=float(cfg.batch_window_ms),
        max_batch=int(cfg.max_batch),
        api_token=None if cfg.api_token is None else str(cfg.api_token),
        titles=rule,
    )
    return Service(embedder, gallery, settings)


def open_gallery(
    cfg: DictConfig,
    embedder: Embedder,
    run,
    data_dir: Path,
    background=DEFAULT_BACKGROUND,
    titles: TitleEmbedder | None = None,
) -> Gallery:
    """The gallery of `gallery_db` (created and seeded on first use), orphan images of an
    interrupted addition removed; with gallery_db=null, one in memory only. Its key is the
    weights' and the background's: both decide what an image embeds to (titles are read
    back as stored and vectorised by `titles`, the run's title embedder, at every start)."""
    key = f"{embedder.key}/background={'-'.join(map(str, background))}"
    stores = data_dir / "stores"
    if not cfg.gallery_db:
        images, postings, _ = gallery_postings(cfg, run, embedder.image_size, stores, background)
        log.info(
            "Embedding %d gallery postings (gallery_db=null: additions are not kept)", len(postings)
        )
        embeddings = embedder.embed_all(images)
        gallery = Gallery(embeddings.shape[1], key, titles=titles)
        gallery.add(embeddings, postings)
        return gallery
    store = GalleryStore(cfg.gallery_db)
    try:
        meta = store.meta()
        if meta and meta.get("schema") != str(SCHEMA_VERSION):
            raise ValueError(
                f"gallery_db={str(store.path)!r} has schema {meta.get('schema')!r}, this "
                f"service reads {SCHEMA_VERSION}: serve it with the version that wrote it"
            )
        if meta and meta["model_key"] != key:
            if not cfg.reembed:
                raise ValueError(other_weights_message(store, meta, embedder, key))
            reembed(store, embedder, int(meta["dim"]), key, background)
        seed_images, seed, seed_key = gallery_postings(
            cfg, run, embedder.image_size, stores, background
        )
        if store.meta().get("seed") != seed_key:
            log.info("Embedding %d gallery postings into %s", len(seed), store.path)
            x = l2_normalize(embedder.embed_all(seed_images))
            meta = {"schema": str(SCHEMA_VERSION), "model_key": key}
            meta |= {"dim": str(x.shape[1]), "seed": seed_key}
            try:
                store.reseed(x, seed, meta)
            except DuplicatePostingError as exc:
                raise ValueError(
                    f"the gallery postings ({cfg.gallery or 'the run'}) reuse the posting_id "
                    f"of a posting added to gallery_db={str(store.path)!r} ({exc}): rename "
                    "them in the CSV, or use another gallery_db"
                ) from None
        gallery = Gallery.from_store(store, int(store.meta()["dim"]), key, titles)
    except BaseException:
        store.close()
        raise
    log.info(
        "Gallery %s: %d postings, %d of them added", store.path, len(gallery), store.count(False)
    )
    remove_orphans(store, data_dir / IMAGES_SUBDIR)
    return gallery


def other_weights_message(store: GalleryStore, meta: dict, embedder: Embedder, key: str) -> str:
    added = store.count(seed=False)
    return (
        f"gallery_db={str(store.path)!r} holds embeddings of other weights "
        f"or another background ({meta['model_key']}, not {key} of {embedder.name}), "
        f"among them {added} posting(s) added through POST /gallery. Serve the model that "
        "built it; or start once with reembed=true to re-embed every posting from its stored "
        "image with this model (the file is updated in place); or set gallery_db to another "
        "file (this one keeps its postings)."
    )


def reembed(
    store: GalleryStore, embedder: Embedder, old_dim: int, key: str, background, batch: int = 256
) -> None:
    """Embed every stored posting again, from its image file, with `embedder`; one
    transaction, so an interrupted re-embedding leaves the old embeddings in place."""
    from shared.data.sources import decode_image

    postings, _ = store.rows(old_dim)
    missing = [p for p in postings if not Path(p.image).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot re-embed gallery_db={str(store.path)!r}: {len(missing)} posting image(s) "
            f"are missing, e.g. {missing[0].posting_id!r} -> {missing[0].image}"
        )
    log.info("Re-embedding the %d postings of %s with %s", len(postings), store.path, embedder.name)
    parts = []
    for start in range(0, len(postings), batch):
        chunk = postings[start : start + batch]
        pixels = [
            decode_image(p.image, embedder.image_size, background=background).transpose(2, 0, 1)
            for p in chunk
        ]
        parts.append(embedder.embed(np.ascontiguousarray(np.stack(pixels))))
    x = l2_normalize(np.concatenate(parts))
    store.set_embeddings(x, {"model_key": key, "dim": str(x.shape[1])})


def remove_orphans(store: GalleryStore, images_dir: Path) -> None:
    """Delete the image files no posting refers to: written by an addition that a crash
    interrupted before its commit (additions write their image files first)."""
    if not images_dir.is_dir():
        return
    kept = {Path(image).name for image in store.images()}
    orphans = [p for p in images_dir.iterdir() if p.is_file() and p.name not in kept]
    for path in orphans:
        path.unlink(missing_ok=True)
    if orphans:
        log.warning(
            "Removed %d orphan image(s) of unfinished additions from %s", len(orphans), images_dir
        )
