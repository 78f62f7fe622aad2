"""conf/serve.yaml -> the embedder, the gallery and the settings the app is built from.

The model is a product-matching run (`run_dir`, default: the newest run under `runs_root`)
or, with `onnx=...`, its ONNX export. The run also gives the defaults: the threshold its
evaluation chose (stored in the checkpoint), its min2 rule, and the gallery (the postings it
was trained on, e.g. the synthetic products). A saved gallery (`index_path`) built with the
same weights is loaded instead of embedding the CSV again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from matching.infer import run_threshold
from matching.service.app import Settings
from matching.service.embedder import Embedder, OnnxEmbedder, TorchEmbedder, file_key
from matching.service.gallery import Gallery, Posting

log = logging.getLogger(__name__)


@dataclass
class Service:
    embedder: Embedder
    gallery: Gallery
    settings: Settings


def newest_run(runs_root: str | Path) -> Path:
    """The newest run directory (names are timestamps) under `runs_root` with a config and
    a checkpoint; FileNotFoundError saying how to train one."""
    root = Path(runs_root)
    runs = sorted(root.glob("*/checkpoints/*.ckpt")) if root.is_dir() else []
    runs = [p.parent.parent for p in runs if (p.parent.parent / ".hydra" / "config.yaml").is_file()]
    if not runs:
        raise FileNotFoundError(
            f"no trained product-matching run under runs_root={str(root)!r}. Train one first "
            "with `python product-matching/run.py` (a quick one: `python "
            "product-matching/run.py trainer.max_epochs=1 trainer.check_val_every_n_epoch=1`), "
            "or pass run_dir=<a run directory>, or onnx=<model.onnx> with threshold= and "
            "gallery=."
        )
    return max(runs, key=lambda p: p.name)


def gallery_postings(cfg: DictConfig, run, image_size: int, store_root: Path):
    """(uint8 images [N, 3, S, S], postings): the CSV `gallery`, or the run's own postings."""
    from shared.data.sources import CsvSource
    from shared.data.store import build_store

    if cfg.gallery:
        source = CsvSource(
            str(cfg.gallery),
            cfg.gallery_image_dir,
            label_col=None,
            id_col="posting_id",
        )
        store = build_store(source, store_root, image_size, name="gallery")
    elif run is not None:
        datamodule = run.datamodule  # the run's postings (synthetic ones written as CSV + PNG)
        datamodule.setup()
        source, store = datamodule.source, datamodule.store
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
    return store.images, postings


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
            file_key(run.checkpoint),
        )
    return embedder, run


def build_service(cfg: DictConfig, embedder: Embedder, run=None) -> Service:
    """The gallery embedded by `embedder` and the settings, defaults taken from `run`."""
    threshold = cfg.threshold
    if threshold is None:
        if run is None:
            raise ValueError("threshold=<similarity> is needed when no run is given")
        threshold = run_threshold(run.callbacks_state)
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

    data_dir = Path(cfg.data_dir)
    index_path = Path(cfg.index_path) if cfg.index_path else None
    if index_path is not None and index_path.is_file():
        gallery = Gallery.load(index_path, embedder.key)
        log.info("Loaded gallery %s (%d postings)", index_path, len(gallery))
    else:
        images, postings = gallery_postings(cfg, run, embedder.image_size, data_dir / "stores")
        log.info("Embedding %d gallery postings", len(postings))
        embeddings = embedder.embed_all(images)
        gallery = Gallery(embeddings.shape[1], embedder.key, index_path)
        gallery.add(embeddings, postings)

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
        max_decodes=int(cfg.max_decodes),
        queue_timeout_s=float(cfg.queue_timeout_s),
        body_timeout_s=float(cfg.body_timeout_s),
        batch_window_ms=float(cfg.batch_window_ms),
        max_batch=int(cfg.max_batch),
        api_token=None if cfg.api_token is None else str(cfg.api_token),
    )
    return Service(embedder, gallery, settings)
