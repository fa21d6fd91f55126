"""HTTP serving of a memory: classify and neighbours for applications, admin add/remove, version pickup.

``create_app(memory_path, ...)`` returns a FastAPI app; ``vismem serve`` runs it with uvicorn on
127.0.0.1 unless told otherwise. Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

    GET  /v1/health            liveness + the version being served
    GET  /v1/info              version, live item count, dimension, classes, shards, limits
    POST /v1/classify          embeddings (or base64 images with --encoder) -> label, scores, neighbours
    POST /v1/neighbors         embeddings (or images) -> the k nearest items
    POST /v1/admin/items       add items (a Beam ``add`` publishing a new version)      bearer token
    POST /v1/admin/remove      remove items (unlearning; a new version, durable at once)  bearer token

Versions: a background thread checks ``latest_version`` every ``poll_s`` seconds; a newer version is
opened beside the current one and swapped in atomically. Requests already running finish on the
version they started with (it is closed when its last request ends), so no request is dropped.
Admin changes swap the new version in before they answer: a removed item is never served again.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hmac
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory import leases, voting
from memory import manifest as mf
from memory.memory import Memory

log = logging.getLogger("vismem.serve")
TOKEN_ENV = "VISMEM_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16
# The server's own adds are small: one in-process worker starts in a second, a process pool does not.
DEFAULT_ADD_BEAM_ARGS = ("--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything more is refused with a 4xx naming the limit."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_batch: int = 256        # queries (embeddings or images) per request
    max_k: int = 1000
    max_add_items: int = 10_000  # items per admin add
    max_remove_ids: int = 100_000


# ---- request and response models (they make the OpenAPI schema) ------------------------------------

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class Query(BaseModel):
    model_config = _STRICT
    embeddings: list[list[float]] | None = Field(
        None, description="query embeddings, one row per query (L2-normalised by the server)",
        examples=[[[0.1, 0.7, 0.2]]])
    images: list[str] | None = Field(
        None, description="base64-encoded image files (PNG, JPEG, ...); needs a server started with --encoder")
    k: int = Field(10, description="neighbours per query")
    probe_shards: int | None = Field(
        None, ge=1, description="k-means memories: search only the P shards nearest each query (default: all)")


class ClassifyQuery(Query):
    k: int = Field(50, description="neighbours that vote")
    method: Literal[tuple(voting.METHODS)] = Field("rank", description="voting rule")  # type: ignore[valid-type]
    alpha: float = Field(2.0, gt=0, description="rank voting: w = 1 / (alpha + rank)")
    tau: float = Field(0.07, gt=0, description="softmax voting temperature")
    xi: float = Field(1.0, gt=0, description="distance voting exponent")
    use_weights: bool = Field(True, description="apply the items' vote multipliers (soft pruning)")
    neighbours: bool = Field(True, description="include the neighbours behind each decision")


class Neighbour(BaseModel):
    id: str
    label: int
    label_name: str | None
    sim: float


class NeighboursResponse(BaseModel):
    version: int
    neighbours: list[list[Neighbour]]


class Decision(BaseModel):
    label: str | None = Field(description="predicted class name (null when no neighbour could vote)")
    label_index: int
    scores: dict[str, float] = Field(description="the voting rule's score per class")
    neighbours: list[Neighbour] | None = None


class ClassifyResponse(BaseModel):
    version: int
    method: str
    k: int
    results: list[Decision]


class Item(BaseModel):
    model_config = _STRICT
    id: str = Field(min_length=1, max_length=1024)
    embedding: list[float]
    label: str = Field(description="class name; new names need class_names")
    source: str = ""
    uri: str = ""


class AddRequest(BaseModel):
    model_config = _STRICT
    items: list[Item] = Field(min_length=1)
    class_names: list[str] | None = Field(
        None, description="the memory's classes in order followed by new ones, when adding new classes")
    readmit: bool = Field(False, description="accept ids that were removed (unlearned) before")


class RemoveRequest(BaseModel):
    model_config = _STRICT
    ids: list[str] | None = Field(None, description="item ids to remove")
    label: str | None = Field(None, description="remove every item of this class")
    source: str | None = Field(None, description="remove every item from this source")
    reason: str | None = None


# ---- the served memory: atomic swap with per-version reference counts ------------------------------

class _Slot:
    def __init__(self, mem: Memory):
        self.mem = mem
        self.users = 0
        self.retired = False


class ServedMemory:
    """The currently served version of a memory, swapped atomically when a newer one is published.

    ``with served.use() as mem:`` pins a version for one request; a retired version is closed by
    the last request that used it.
    """

    def __init__(self, path: str, *, version: int | None = None, lease_s: float = 600.0):
        self.path = path
        self.pinned = version is not None
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._slot = _Slot(self._open(version))
        self._lease_t = time.monotonic()
        self.last_check_error: str | None = None
        self.swaps = 0

    def _open(self, version):
        return Memory.open(self.path, version, lease_s=self.lease_s)

    @property
    def version(self) -> int:
        return self._slot.mem.version

    @contextlib.contextmanager
    def use(self):
        with self._lock:
            slot = self._slot
            slot.users += 1
        try:
            yield slot.mem
        finally:
            with self._lock:
                slot.users -= 1
                done = slot.retired and slot.users == 0
            if done:
                slot.mem.close()

    def refresh(self) -> bool:
        """Open and swap in the latest version if it is newer; True when a swap happened."""
        if self.pinned:
            return False
        with self._reload_lock:
            latest = mf.latest_version(self.path)
            if latest is None or latest <= self.version:
                self._renew_lease()
                return False
            new = self._open(latest)
            with self._lock:
                old, self._slot = self._slot, _Slot(new)
                old.retired = True
                done = old.users == 0
            self._lease_t = time.monotonic()
            self.swaps += 1
            log.info("serving %s version %d (was %d)", self.path, latest, old.mem.version)
            if done:
                old.mem.close()
            return True

    def _renew_lease(self):
        """Keep ``vismem gc`` away from the served version: replace the lease before it expires."""
        if time.monotonic() - self._lease_t < self.lease_s / 2:
            return
        with self._lock:
            mem = self._slot.mem
            if mem.lease is None:
                return
            old, mem.lease = mem.lease, leases.acquire(self.path, mem.version, self.lease_s)
        self._lease_t = time.monotonic()
        leases.release(old)

    def close(self):
        with self._lock:
            slot = self._slot
            slot.retired = True
            done = slot.users == 0
        if done:
            slot.mem.close()


class _Poller(threading.Thread):
    def __init__(self, served: ServedMemory, interval: float):
        super().__init__(name="vismem-version-poller", daemon=True)
        self.served, self.interval, self.stop = served, interval, threading.Event()

    def run(self):
        while not self.stop.wait(self.interval):
            try:
                self.served.refresh()
                self.served.last_check_error = None
            except Exception as exc:  # noqa: BLE001 - keep serving the current version; report why
                self.served.last_check_error = f"{type(exc).__name__}: {exc}"
                log.warning("version check of %s failed, still serving version %d: %s",
                            self.served.path, self.served.version, exc)


# ---- admin token ---------------------------------------------------------------------------------

def read_admin_token(token_file: str | None = None, env: dict | None = None) -> str | None:
    """The admin bearer token: from ``token_file`` if given, else ``$VISMEM_ADMIN_TOKEN``, else None.

    Raises:
        ValueError: an empty or short token (fewer than 16 characters), or an unreadable file.
    """
    env = os.environ if env is None else env
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the admin token file {token_file}: {exc}") from exc
        origin = token_file
    elif env.get(TOKEN_ENV):
        token, origin = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token in {origin} is {len(token)} characters; use at least "
                         f"{MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


# ---- the app -------------------------------------------------------------------------------------

class _BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413, by header or while reading.

    The body is read here (at most ``limit`` bytes are held) and replayed to the app, so a chunked
    upload without a length is cut off as early as one that declares its size.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit, int(declared))
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _too_large(send, self.limit, f"more than {seen}")
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send, limit, size):
    import json

    body = json.dumps({"error": f"request body of {size} bytes exceeds the limit of {limit} bytes "
                                "(send fewer queries per request)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def create_app(memory_path: str, *, version: int | None = None, encoder: str | None = None,
               image_size: int | None = None, admin_token: str | None = None, poll_s: float = 2.0,
               limits: Limits = Limits(), add_beam_args=DEFAULT_ADD_BEAM_ARGS, lease_s: float = 600.0) -> FastAPI:
    """A FastAPI app serving the memory at ``memory_path`` (local or ``gs://``).

    Args:
        version: pin this version (no pickup of newer ones); default: the latest, followed.
        encoder: an encoder name (``pipelines.encoders``) to accept images as well as embeddings.
        admin_token: enables the admin endpoints for requests bearing it; None disables them.
        poll_s: how often to look for a newer version (<= 0: never; admin changes still swap).
        add_beam_args: Beam options of the ``add`` pipeline behind ``POST /v1/admin/items``.

    Raises:
        FileNotFoundError / MemoryFormatError: no readable memory at ``memory_path``.
    """
    if admin_token is not None and len(admin_token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
    served = ServedMemory(memory_path, version=version, lease_s=lease_s)
    poller = _Poller(served, poll_s) if poll_s > 0 and version is None else None
    enc = _EncoderBox(encoder, image_size) if encoder else None
    admin_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if poller:
            poller.start()
        try:
            yield
        finally:
            if poller:
                poller.stop.set()
                poller.join(5)
            served.close()

    app = FastAPI(
        title="vismem", version=_package_version(), lifespan=lifespan,
        description="Classification by retrieval from a visual memory: the k nearest (embedding, label) "
        "pairs and a voting rule decide; every answer carries its neighbours.",
    )
    app.state.served = served
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            e = next(e for e in errors if e.get("type") == "json_invalid")
            msg = f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))} (at character {e['loc'][-1]})"
            return JSONResponse({"error": msg}, status_code=400)
        parts = []
        for e in errors[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            what = e.get("msg", "")
            if e.get("type") == "finite_number":
                what = "NaN and infinite values are not allowed"
            parts.append(f"{where}: {what}" if where else what)
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return JSONResponse({"error": "invalid request: " + "; ".join(parts) + more, "detail": _jsonable(errors[:20])},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def admin(authorization: str | None = Header(None, description="Bearer ADMIN_TOKEN")):
        if admin_token is None:
            raise _error(403, f"admin endpoints are disabled: start the server with ${TOKEN_ENV} or "
                              "--admin-token-file to enable them")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "admin endpoints need 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), admin_token.encode()):
            raise HTTPException(401, "invalid admin token", headers={"WWW-Authenticate": "Bearer"})

    def queries(body: Query, mem: Memory) -> np.ndarray:
        if (body.embeddings is None) == (body.images is None):
            raise _error(422, "give exactly one of 'embeddings' or 'images'")
        n = len(body.embeddings if body.embeddings is not None else body.images)
        if n == 0:
            raise _error(422, "no queries: the batch is empty")
        if n > limits.max_batch:
            raise _error(413, f"batch of {n} queries exceeds the limit of {limits.max_batch} per request")
        if not 1 <= body.k <= limits.max_k:
            raise _error(422, f"k must be between 1 and {limits.max_k}, got {body.k}")
        if body.images is not None:
            if enc is None:
                raise _error(422, "this server takes embeddings only: start it with --encoder NAME to send images")
            q = enc.embed(body.images)
            if q.shape[1] != mem.dim:
                raise _error(422, f"encoder {encoder} gives {q.shape[1]}-d embeddings; the memory is {mem.dim}-d")
            return q
        bad = next((i for i, row in enumerate(body.embeddings) if len(row) != mem.dim), None)
        if bad is not None:
            raise _error(422, f"embeddings[{bad}] has {len(body.embeddings[bad])} values; this memory's "
                              f"dimension is {mem.dim}")
        with np.errstate(over="ignore"):
            q = np.asarray(body.embeddings, dtype=np.float32)
        if not np.isfinite(q).all():  # finite in JSON, but beyond float32's range
            row = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
            raise _error(422, f"embeddings[{row}] overflows float32")
        zero = np.flatnonzero(~q.any(axis=1))
        if len(zero):
            raise _error(422, f"embeddings[{int(zero[0])}] is the zero vector: it has no direction to compare")
        return q

    def neighbour_rows(nb, names, i) -> list[dict]:
        return [{"id": str(nb.ids[i, j]), "label": int(nb.labels[i, j]),
                 "label_name": names[nb.labels[i, j]] if 0 <= nb.labels[i, j] < len(names) else None,
                 "sim": float(nb.sims[i, j])}
                for j in range(nb.ids.shape[1]) if nb.ids[i, j] != ""]

    @app.get("/v1/health", summary="liveness and the version served")
    def health():
        return {"status": "ok", "version": served.version, "last_check_error": served.last_check_error}

    @app.get("/v1/info", summary="the served memory: version, counts, classes, limits")
    def info():
        with served.use() as mem:
            m = mem.manifest
            return {"memory": memory_path, "version": mem.version, "pinned": served.pinned,
                    "items": len(mem), "removed_pending_compaction": int(m.get("removed_count", 0)),
                    "dim": mem.dim, "classes": mem.class_names, "backend": m["backend"],
                    "shards": len(m["shards"]), "encoder": m.get("encoder") or {},
                    "serving_encoder": encoder, "admin_enabled": admin_token is not None,
                    "limits": dataclasses.asdict(limits), "version_swaps": served.swaps}

    @app.post("/v1/neighbors", response_model=NeighboursResponse, summary="the k nearest items of each query")
    def neighbors(body: Query):
        with served.use() as mem:
            q = queries(body, mem)
            nb = _search(mem.search, q, body.k, probe_shards=body.probe_shards)
            names = mem.class_names
            return {"version": mem.version, "neighbours": [neighbour_rows(nb, names, i) for i in range(len(q))]}

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True,
              summary="classify each query by its neighbours' votes")
    def classify(body: ClassifyQuery):
        with served.use() as mem:
            q = queries(body, mem)
            res = _search(mem.classify, q, body.k, body.method, use_weights=body.use_weights,
                          alpha=body.alpha, tau=body.tau, xi=body.xi, probe_shards=body.probe_shards)
            names = mem.class_names
            results = []
            for i, p in enumerate(res.predictions):
                results.append({
                    "label": names[p] if p >= 0 else None, "label_index": int(p),
                    "scores": {names[c]: float(res.scores[i, c]) for c in range(len(names))},
                    "neighbours": neighbour_rows(res.neighbours, names, i) if body.neighbours else None,
                })
            return {"version": mem.version, "method": body.method, "k": body.k, "results": results}

    @app.post("/v1/admin/items", dependencies=[Depends(admin)],
              summary="add items as a new version (bearer token)")
    def add_items(body: AddRequest):
        if len(body.items) > limits.max_add_items:
            raise _error(413, f"{len(body.items)} items exceed the limit of {limits.max_add_items} per request")
        with admin_lock:
            with served.use() as mem:
                dim, names = mem.dim, list(mem.class_names)
            names = list(body.class_names) if body.class_names else names
            bad = next((i for i, it in enumerate(body.items) if len(it.embedding) != dim), None)
            if bad is not None:
                raise _error(422, f"items[{bad}].embedding has {len(body.items[bad].embedding)} values; "
                                  f"this memory's dimension is {dim}")
            unknown = sorted({it.label for it in body.items} - set(names))
            if unknown:
                raise _error(422, f"unknown class(es) {unknown[:5]}; known: {names[:20]}; pass class_names "
                                  "(the memory's classes followed by the new ones) to add classes")
            result = _run_add(memory_path, body, names, add_beam_args)
            served.refresh()
            return result

    @app.post("/v1/admin/remove", dependencies=[Depends(admin)],
              summary="remove items (unlearning) as a new version (bearer token)")
    def remove(body: RemoveRequest):
        from memory.mutations import remove_items

        given = [x for x in (body.ids, body.label, body.source) if x is not None]
        if len(given) != 1:
            raise _error(422, "give exactly one of 'ids', 'label' or 'source'")
        if body.ids is not None and not body.ids:
            raise _error(422, "'ids' is empty: nothing to remove")
        if body.ids is not None and len(body.ids) > limits.max_remove_ids:
            raise _error(413, f"{len(body.ids)} ids exceed the limit of {limits.max_remove_ids} per request")
        with admin_lock:
            try:
                result = remove_items(memory_path, ids=body.ids, label=body.label, source=body.source,
                                      reason=body.reason)
            except ValueError as exc:
                raise _error(422, str(exc)) from exc
            served.refresh()
            return result

    return app


def _search(fn, *args, **kwargs):
    """Run a memory call; its ValueErrors (bad queries) become 422 answers."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise _error(422, str(exc)) from exc


def _run_add(memory_path: str, body: AddRequest, names: list, beam_args) -> dict:
    """Stage the items as an embedding shard and run the build pipeline's ``add`` on it."""
    from memory import schema
    from pipelines.build import BuildFailed, add_to_memory

    ids = [it.id for it in body.items]
    emb = np.asarray([it.embedding for it in body.items], dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.isfinite(emb).all() or (norms == 0).any():
        raise _error(422, "item embeddings must be finite and non-zero")
    emb = emb / norms
    labels = [names.index(it.label) for it in body.items]
    n = len(ids)
    prov = {"label_source": np.full(n, "human", dtype=object), "confidence": np.ones(n, np.float32),
            "source": np.asarray([it.source for it in body.items], dtype=object),
            "uri": np.asarray([it.uri for it in body.items], dtype=object)}
    staging = tempfile.mkdtemp(prefix="vismem-serve-add-")
    try:
        path = os.path.join(staging, "items.parquet")
        schema.write_embeddings(path, schema.embedding_table(ids, emb, labels, provenance=prov))
        try:
            return add_to_memory(memory_path, path, class_names=names, readmit=body.readmit,
                                 pipeline_args=list(beam_args))
        except (BuildFailed, ValueError) as exc:
            raise _error(422, str(exc)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _EncoderBox:
    """An encoder loaded on first use (images are optional), decoding base64 image files."""

    def __init__(self, name: str, image_size: int | None):
        from pipelines.encoders import encoder_image_size

        self.name = name
        self.size = encoder_image_size(name, image_size)  # an unknown name fails at start-up
        self.image_size = image_size
        self._model = None
        self._lock = threading.Lock()

    def embed(self, images: list[str]) -> np.ndarray:
        from pipelines.encoders import load_encoder
        from pipelines.images import BadImage, decode_image

        pixels = []
        for i, text in enumerate(images):
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise _error(422, f"images[{i}] is not valid base64") from None
            try:
                pixels.append(decode_image(data, self.size, max_pixels=50_000_000))
            except BadImage as exc:
                raise _error(422, f"images[{i}]: {exc}") from None
        with self._lock:  # one forward pass at a time: torch already uses every core
            if self._model is None:
                self._model = load_encoder(self.name, self.image_size)
            return self._model.embed(np.stack(pixels))


def _jsonable(errors):
    return [{k: (v if isinstance(v, (str, int, float, bool, list, type(None))) else str(v))
             for k, v in e.items() if k != "input"} for e in errors]


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vismem")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "0+source"


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(memory_path: str, *, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          admin_token_file: str | None = None, log_level: str = "info", **app_kwargs) -> None:
    """Run the app with uvicorn until interrupted.

    Raises:
        ValueError: a non-loopback ``host`` without ``allow_remote``, or a bad admin token.
    """
    import uvicorn

    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"refusing to listen on {host}: that is reachable from other machines. Pass "
                         "--allow-remote to mean it (and put TLS and a token in front of admin endpoints)")
    token = read_admin_token(admin_token_file)
    app = create_app(memory_path, admin_token=token, **app_kwargs)
    log.info("serving %s version %d on http://%s:%d (admin %s)", memory_path, app.state.served.version, host, port,
             "enabled" if token else "disabled")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
