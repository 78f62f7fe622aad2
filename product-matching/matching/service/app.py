"""The FastAPI app: match uploaded images against the gallery, add postings, a web page.

    app = build_app(embedder, gallery, settings)     # then: uvicorn.run(app, ...)

Endpoints are plain `def`s on FastAPI's thread pool; every forward pass goes through one
`MicroBatcher`, which embeds concurrent requests' images together. Limits, each answered
with a 4xx naming the upload and the limit: the whole request body (`max_upload_mb`, from
Content-Length before reading and by counting while reading), the images per request
(`max_files`), the pixels of one image (`max_pixels`) and all images of a request together
(`max_request_pixels`), both read from the headers before decoding, the formats (PNG, JPEG,
WebP, GIF, BMP, TIFF), truncated or corrupt files. Overload: at most `max_decodes` requests
decode at once and a request that waits `queue_timeout_s` for a slot or for the model gets
503 + Retry-After; a body not in within `body_timeout_s` gets 408. With `api_token` set,
POST /gallery needs `Authorization: Bearer <token>` (401). Added images are written only
under `data_dir/gallery_images/`, named by a generated id, never by anything the client sent.
Titles: with a run trained on titles and images (`settings.titles`), an image sent to
/match with a `title` is matched by the run's rule (`matching.service.titles`); without one,
or with a run of images only (the title is then ignored: `by_title` false), by image alone.

(No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, and
they refer to `settings` of the enclosing `build_app`.)
"""

import errno
import hmac
import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matching.service.batching import Busy, MicroBatcher
from matching.service.embedder import Embedder, OnnxEmbedder
from matching.service.gallery import DuplicatePostingError, Gallery, Hit, Posting, select_matches
from matching.service.images import (
    EXTENSIONS,
    ImageRejected,
    decode_upload,
    describe_upload,
    read_header,
)
from matching.service.limits import Admission, BodyTimeout, busy
from matching.service.page import PAGE
from matching.service.titles import TitleHit, TitleRule, title_matches
from shared.data.sources import DEFAULT_BACKGROUND, check_background
from shared.retrieval.text import has_title
from shared.retrieval.threshold import MAX_NEIGHBOURS

# Ids a client may choose for new postings: no separators, so never a path.
POSTING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TEXT = {"label_group": 128, "title": 512}
IMAGES_SUBDIR = "gallery_images"


@dataclass(frozen=True)
class Settings:
    """What the service enforces and reports; conf/serve.yaml holds the defaults."""

    threshold: float  # image similarity a gallery posting needs to be a match
    min2: float | None  # keep the nearest posting of a query left without matches if >= this
    top_k: int  # neighbours returned by default
    max_top_k: int  # largest `top_k` a request may ask for
    max_upload_mb: float  # whole request body
    max_files: int  # images per request
    max_pixels: int  # width x height of one image, checked before decoding
    max_request_pixels: int  # all images of one request together, checked before decoding
    data_dir: Path  # the only folder the service writes to (added images)
    # Host names the service answers to besides the loopback ones (DNS-rebinding guard).
    allowed_hosts: tuple[str, ...] = ()
    # RGB that transparent pixels are composited on: the gallery store's, so an uploaded
    # copy of a gallery image decodes to the same pixels.
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    max_decodes: int = 2  # requests decoding at once (decoding is what costs memory)
    queue_timeout_s: float = 2.0  # wait for a decode slot or the model, then 503
    body_timeout_s: float = 30.0  # the whole request body must arrive within this, else 408
    batch_window_ms: float = 0.0  # how long a batch waits for more queries (0: those queued)
    max_batch: int = 16  # images per forward pass; 1: no batching
    api_token: str | None = field(default=None, repr=False)  # POST /gallery needs it if set
    # The run's title combination (None: images only): queries sent with a title use it.
    titles: TitleRule | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        for key in (
            "top_k",
            "max_top_k",
            "max_files",
            "max_pixels",
            "max_request_pixels",
            "max_decodes",
            "max_batch",
        ):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k={self.top_k} is above max_top_k={self.max_top_k}")
        for key in ("max_upload_mb", "queue_timeout_s", "body_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not self.batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.api_token is not None and len(self.api_token) < 16:
            raise ValueError("api_token must be at least 16 characters (or null: no token)")
        object.__setattr__(self, "background", check_background(self.background, "background"))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class BodySizeLimit:
    """ASGI middleware capping the request body at `max_bytes`: a declared Content-Length
    above it gets 413 before a byte is read; otherwise the bytes are counted as they arrive
    (chunked uploads too) and the read that passes the limit raises a 413 HTTPException,
    which FastAPI answers like any other."""

    def __init__(self, app: ASGIApp, max_bytes: int, message: str) -> None:
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            error = None
            if not declared.strip().isdigit():
                error = JSONResponse({"detail": f"invalid Content-Length {declared[:40]!r}"}, 400)
            elif int(declared) > self.max_bytes:
                error = JSONResponse({"detail": self.message}, 413)
            if error is not None:
                await error(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _host_name(value: str) -> str:
    """`host[:port]` or `[v6]:port` -> the host name, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class SameOrigin:
    """ASGI middleware: answer only requests addressed to this service by one of its names
    (a page whose DNS name was re-pointed at 127.0.0.1 sends its own name: 421), and refuse
    a state-changing request from a web page of another origin (403). A page the operator
    merely visits could otherwise add postings; clients without an Origin header (curl,
    scripts) are not browsers and pass."""

    UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in (*LOOPBACK, *allowed_hosts)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        error = None
        if _host_name(host) not in self.allowed:
            error = JSONResponse(
                {"detail": f"Host {host[:80]!r} is not served here (allowed_hosts: "
                 f"{', '.join(sorted(self.allowed))})"},
                421,
            )  # fmt: skip
        elif scope["method"] in self.UNSAFE and "origin" in headers:
            origin = headers["origin"]
            if urlsplit(origin).netloc.lower() != host.lower():
                error = JSONResponse(
                    {"detail": f"cross-origin {scope['method']} from {origin[:80]!r} refused"},
                    403,
                )
        if error is not None:
            await error(scope, receive, send)
            return
        await self.app(scope, receive, send)


class PostingOut(BaseModel):
    posting_id: str
    label_group: str | None
    title: str | None
    similarity: float  # image cosine
    title_similarity: float | None = None  # of a match by the title rule (both have titles)
    image_url: str


class QueryResult(BaseModel):
    file: str  # which upload: files[i] and its client filename
    # similarity >= threshold (or the min2 rule), best first; with by_title, the run's title
    # rule at titles.threshold instead
    matches: list[PostingOut]
    neighbours: list[PostingOut]  # the top_k most similar images, matched or not
    by_title: bool = False  # matched by the title rule (a title given, the run has one)


class MatchResponse(BaseModel):
    threshold: float
    min2: float | None
    titles: TitleRule | None  # the run's title combination, None: images only
    top_k: int
    gallery_size: int
    results: list[QueryResult]


class AddResponse(BaseModel):
    added: list[str]
    gallery_size: int


class Health(BaseModel):
    status: str
    model: str
    backend: str
    image_size: int
    embedding_dim: int
    gallery_size: int
    threshold: float
    min2: float | None
    top_k: int
    max_top_k: int
    max_upload_mb: float
    max_files: int
    max_pixels: int
    max_request_pixels: int
    background: tuple[int, int, int]
    max_decodes: int
    max_batch: int
    batch_window_ms: float
    titles: TitleRule | None
    auth_required: bool  # POST /gallery needs `Authorization: Bearer <api_token>`


def image_url(posting_id: str) -> str:
    return f"/gallery/{quote(posting_id, safe='')}/image"


def posting_out(hit: Hit | TitleHit) -> PostingOut:
    p = hit.posting
    title_sim = getattr(hit, "title_similarity", None)
    return PostingOut(
        posting_id=p.posting_id,
        label_group=p.label_group,
        title=p.title,
        similarity=round(hit.similarity, 6),
        title_similarity=None if title_sim is None else round(title_sim, 6),
        image_url=image_url(p.posting_id),
    )


def check_per_file(fields: dict[str, list[str] | None], n_files: int) -> None:
    """422 unless each form field gives one value per file (or none), within its length."""
    for key, values in fields.items():
        if values is not None and len(values) != n_files:
            raise HTTPException(
                422,
                f"{key}: {len(values)} value(s) for {n_files} file(s); give one per "
                "file, in the same order, or none",
            )
        for value in values or ():
            if key in MAX_TEXT and len(value) > MAX_TEXT[key]:
                raise HTTPException(422, f"{key} is longer than {MAX_TEXT[key]} characters")


def write_image(folder: Path, data: bytes, ext: str, written: list[Path]) -> Path:
    """Write an added image under a new random name, flushed to disk (an acknowledged
    posting must keep its image through a power cut); `written` gets the path first, so
    a failed write is cleaned up too."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}{ext}"
    with open(path, "xb") as fh:
        written.append(path)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_app(embedder: Embedder, gallery: Gallery, settings: Settings) -> FastAPI:
    """The service around an embedder and a gallery of the same embedding size."""
    app = FastAPI(
        title="Product matching",
        summary="Which gallery postings show the same product as this image?",
        version="1",
    )
    images_dir = Path(settings.data_dir).resolve() / IMAGES_SUBDIR
    backend = "onnx" if isinstance(embedder, OnnxEmbedder) else "torch"
    # Every forward pass goes through one batcher: one at a time, concurrent queries together.
    embedder = MicroBatcher(embedder, settings.batch_window_ms, settings.max_batch)
    decode_slots = Admission(
        settings.max_decodes, settings.queue_timeout_s, "max_decodes", "decoding images"
    )
    bearer = HTTPBearer(auto_error=False, description="api_token of conf/serve.yaml")

    def check_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        """401 unless the request carries the API token (when one is set)."""
        if settings.api_token is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.api_token.encode()):
            raise HTTPException(
                401,
                "adding postings needs the API token: send `Authorization: Bearer <api_token>`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    too_large = (
        f"request body is larger than max_upload_mb={settings.max_upload_mb:g} MB "
        f"({settings.max_upload_bytes} bytes)"
    )
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes, message=too_large)
    app.add_middleware(SameOrigin, allowed_hosts=tuple(settings.allowed_hosts))

    def decode_all(files: list[UploadFile]) -> tuple[np.ndarray, list[str], list[str]]:
        """uint8 [N, 3, S, S], each upload's description and PIL format; HTTP 4xx on the
        first bad one."""
        if len(files) > settings.max_files:
            raise HTTPException(
                413, f"{len(files)} images in one request, above max_files={settings.max_files}"
            )
        uploads = [(describe_upload(i, u.filename), u.file.read()) for i, u in enumerate(files)]
        total = 0  # decoding costs by the pixel: the whole request is budgeted up front
        for what, data in uploads:
            try:
                total += read_header(data, what, settings.max_pixels)[1]
            except ImageRejected as exc:
                raise HTTPException(exc.status, str(exc)) from None
        if total > settings.max_request_pixels:
            raise HTTPException(
                413,
                f"the {len(uploads)} images hold {total} pixels together, above "
                f"max_request_pixels={settings.max_request_pixels}: send fewer or smaller images",
            )
        pixels, names, formats = [], [], []
        with decode_slots.slot():
            for what, data in uploads:
                try:
                    image, fmt = decode_upload(
                        data, what, embedder.image_size, settings.max_pixels, settings.background
                    )
                except ImageRejected as exc:
                    raise HTTPException(exc.status, str(exc)) from None
                pixels.append(image)
                names.append(what)
                formats.append(fmt)
        return np.stack(pixels), names, formats

    def embed(images: np.ndarray) -> np.ndarray:
        try:
            return embedder.embed(images, timeout_s=settings.queue_timeout_s)
        except Busy as exc:
            raise busy(
                f"the service is busy: {exc}; retry shortly", settings.queue_timeout_s
            ) from None

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(
            PAGE,
            headers={
                "Content-Security-Policy": "default-src 'none'; img-src 'self' blob:; "
                "script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        # async: answered on the event loop, not queued behind busy workers on the thread
        # pool, and without the gallery's lock, so a loaded service still says it is alive
        return Health(
            status="ok",
            model=embedder.name,
            backend=backend,
            image_size=embedder.image_size,
            embedding_dim=gallery.dim,
            gallery_size=gallery.size_now,
            auth_required=settings.api_token is not None,
            **{k: v for k, v in asdict(settings).items() if k in Health.model_fields},
        )

    @app.post("/match", response_model=MatchResponse)
    def match(
        files: Annotated[list[UploadFile], File(description="one or more images")],
        top_k: Annotated[
            int | None, Query(ge=1, le=settings.max_top_k, description="neighbours per image")
        ] = None,
        title: Annotated[
            list[str] | None,
            Form(description="one per file (empty: none); used when the run matches titles"),
        ] = None,
    ) -> MatchResponse:
        """Each image's matches (similarity >= threshold, or the run's title rule for an
        image sent with a title) and its top-k neighbours."""
        check_per_file({"title": title}, len(files))
        images, names, _ = decode_all(files)
        k = top_k or settings.top_k
        queries = embed(images)
        rows = gallery.search(queries, max(k, MAX_NEIGHBOURS))
        by_title = titled_matches(queries, title)
        results = []
        for i, (name, hits) in enumerate(zip(names, rows)):
            if i in by_title:
                matches = by_title[i]
            else:
                sims = [h.similarity for h in hits]
                matches = [hits[j] for j in select_matches(sims, settings.threshold, settings.min2)]
            results.append(
                QueryResult(
                    file=name,
                    matches=[posting_out(h) for h in matches],
                    neighbours=[posting_out(h) for h in hits[:k]],
                    by_title=i in by_title,
                )
            )
        return MatchResponse(
            threshold=settings.threshold,
            min2=settings.min2,
            titles=settings.titles,
            top_k=k,
            gallery_size=len(gallery),
            results=results,
        )

    def titled_matches(queries: np.ndarray, titles: list[str] | None) -> dict[int, list]:
        """{query row: its matches by the run's title rule} for the queries sent with a
        title; none when the run has no rule or no gallery posting has a title."""
        rule = settings.titles
        if rule is None or titles is None or not gallery.any_titled:
            return {}
        rows = np.flatnonzero(has_title(titles))
        if not len(rows):
            return {}
        found = title_matches(
            gallery, rule, queries[rows], [titles[i] for i in rows], settings.min2
        )
        return dict(zip(rows.tolist(), found))

    @app.post(
        "/gallery", response_model=AddResponse, status_code=201, dependencies=[Depends(check_token)]
    )
    def add_postings(
        files: Annotated[list[UploadFile], File(description="one image per new posting")],
        posting_id: Annotated[
            list[str] | None,
            Form(description="one per file; letters, digits, _ . - (default: generated)"),
        ] = None,
        label_group: Annotated[list[str] | None, Form(description="one per file")] = None,
        title: Annotated[list[str] | None, Form(description="one per file")] = None,
    ) -> AddResponse:
        """Add postings to the index, searchable by the next request."""
        fields = {"posting_id": posting_id, "label_group": label_group, "title": title}
        check_per_file(fields, len(files))
        ids = [v.strip() for v in posting_id] if posting_id else [""] * len(files)
        for i, pid in enumerate(ids):
            if pid and not POSTING_ID.fullmatch(pid):
                raise HTTPException(
                    422,
                    f"posting_id[{i}]={pid[:80]!r} is not allowed: use 1-64 letters, digits, "
                    "'_', '.' or '-', starting with a letter or digit",
                )
        ids = [pid or f"u{uuid.uuid4().hex[:16]}" for pid in ids]
        repeated = sorted({pid for pid in ids if ids.count(pid) > 1})
        if repeated:
            raise HTTPException(422, f"posting_id given more than once: {repeated[:5]}")
        taken = [pid for pid in ids if pid in gallery]
        if taken:
            raise HTTPException(409, f"posting_id already in the gallery: {taken[:5]}")
        images, _, formats = decode_all(files)
        embeddings = embedder.embed(images)

        written: list[Path] = []
        try:
            postings = []
            for i, (upload, fmt) in enumerate(zip(files, formats)):
                upload.file.seek(0)
                path = write_image(images_dir, upload.file.read(), EXTENSIONS[fmt], written)
                label = label_group[i] if label_group else None
                postings.append(Posting(ids[i], label, title[i] if title else None, str(path)))
            if written:
                fsync_dir(images_dir)  # the files' names are durable before the commit
            size = gallery.add(embeddings, postings)  # durable, then searchable
        except BaseException as exc:
            for path in written:  # nothing was added: no orphan files either
                path.unlink(missing_ok=True)
            if isinstance(exc, DuplicatePostingError):  # another request added the id meanwhile
                raise HTTPException(409, str(exc)) from None
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise HTTPException(
                    507,
                    f"not added, the disk is full ({exc.strerror}): free space under "
                    f"data_dir, then send the postings again",
                ) from None
            raise
        return AddResponse(added=ids, gallery_size=size)

    @app.get("/gallery/{posting_id:path}/image", response_class=FileResponse)
    def posting_image(posting_id: str) -> FileResponse:
        """The image of a gallery posting (what the page shows beside each match)."""
        posting = gallery.get(posting_id)
        if posting is None:
            raise HTTPException(404, f"no posting {posting_id[:80]!r} in the gallery")
        if not Path(posting.image).is_file():
            raise HTTPException(404, f"the image of posting {posting_id[:80]!r} is missing")
        return FileResponse(posting.image, headers={"X-Content-Type-Options": "nosniff"})

    return app
