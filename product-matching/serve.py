"""Product-matching service: `python product-matching/serve.py [key=value ...]`.

Loads a trained run (default: the newest under logs/product-matching/dolg/runs/) or its ONNX
export, embeds the gallery (default: the run's own postings) into a FAISS index and serves

    GET  /                 a web page: upload an image, see its matches and their scores
    POST /match            images -> matches above the run's threshold + top-k neighbours
    POST /gallery          add postings (images + ids / label groups / titles), no restart
    GET  /gallery/{id}/image, GET /health, GET /docs (OpenAPI: /openapi.json)

on http://127.0.0.1:8000. Config: conf/serve.yaml (run_dir, onnx, gallery, threshold,
top_k, max_upload_mb, max_pixels, data_dir, index_path, host, port, api_token, ...).
Bound to a non-loopback host it needs `api_token` (MATCH_API_TOKEN) and warns.
"""

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


if __name__ == "__main__":
    main()
