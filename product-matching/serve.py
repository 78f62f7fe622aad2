"""Product-matching service: `python product-matching/serve.py [key=value ...]`.

Loads a trained run (default: the newest under logs/product-matching/dolg/runs/) or its ONNX
export, embeds the gallery (default: the run's own postings) into a FAISS index and serves

    GET  /                 a web page: upload an image, see its matches and their scores
    POST /match            images (+ titles) -> matches by the run's threshold (or its
                           title rule, for a run trained with titles) + top-k neighbours
    POST /gallery          add postings (images + ids / label groups / titles), no restart
    GET  /gallery/{id}/image, GET /health, GET /docs (OpenAPI: /openapi.json)

on http://127.0.0.1:8000. Config: conf/serve.yaml (run_dir, onnx, gallery, threshold,
top_k, max_upload_mb, max_pixels, data_dir, gallery_db, host, port, api_token, ...).
Postings added with POST /gallery are kept in gallery_db (default
data_dir/gallery.sqlite) across restarts. Bound to a non-loopback host it needs
`api_token` (MATCH_API_TOKEN) and warns.
"""

import contextlib
import logging
import tempfile
from pathlib import Path

import hydra
import uvicorn
from omegaconf import DictConfig

import shared.config  # noqa: F401  (resolvers, PROJECT_ROOT)
from matching.service.app import build_app
from matching.service.loading import load_service
from matching.service.server import check_exposure, server_config

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    check_exposure(str(cfg.host), cfg.api_token)  # before minutes of loading
    # Starlette spools uploads above 1 MB to temporary files while it parses a request; keep
    # those under data_dir too, so the service writes nowhere else.
    spool = Path(cfg.data_dir) / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(spool)
    service = load_service(cfg)
    app = build_app(service.embedder, service.gallery, service.settings)
    log.info(
        "Serving %d postings at threshold %.3f on http://%s:%d/",
        len(service.gallery),
        service.settings.threshold,
        cfg.host,
        cfg.port,
    )
    close_on_shutdown(app, service.gallery)
    config = server_config(
        app,
        cfg.host,
        cfg.port,
        cfg.log_level,
        cfg.max_connections,
        cfg.header_timeout_s,
        cfg.keep_alive_s,
    )
    uvicorn.Server(config).run()


def close_on_shutdown(app, gallery) -> None:
    """Close the gallery's database when the server shuts down (Ctrl-C, SIGTERM), which
    folds its write-ahead log back into gallery_db. At shutdown, not after `uvicorn.run`:
    uvicorn re-raises the signal that stopped it, so code after it would never run."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:
            yield state
        gallery.close()

    app.router.lifespan_context = lifespan


if __name__ == "__main__":
    main()
