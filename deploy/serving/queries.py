"""The application endpoints: ``/v1/classify``, ``/v1/neighbors``, ``/v1/health`` and ``/v1/info``."""
from __future__ import annotations

import dataclasses

import numpy as np
from fastapi import APIRouter

from deploy.serving.dependencies import Serving, ServingDep
from deploy.serving.errors import BODY, COMMON, QUERY, error
from deploy.serving.models import ClassifyQuery, ClassifyResponse, EncoderDescription, Health, Info, \
    NeighboursResponse, Query
from memory.encoder_spec import EncoderSpec
from memory.filters import ItemFilter
from memory.memory import Memory

router = APIRouter(prefix="/v1", responses=COMMON)
_POST = {**BODY, **QUERY}


@router.get("/health", response_model=Health, summary="liveness and the version served")
def health(ctx: ServingDep):
    served = ctx.served
    return {"status": "ok", "version": served.version, "last_check_error": served.last_check_error,
            "last_lease_error": served.last_lease_error}


@router.get("/info", response_model=Info, summary="the served memory: version, counts, classes, limits")
def info(ctx: ServingDep):
    served = ctx.served
    with served.use() as mem:
        m = mem.manifest
        spec = EncoderSpec.from_manifest(m.encoder)
        return {"memory": ctx.memory_path, "version": mem.version, "pinned": served.pinned,
                "items": len(mem), "removed_pending_compaction": m.removed_count or 0,
                "dim": mem.dim, "classes": mem.class_names, "backend": m.backend,
                "shards": len(m.shards), "encoder": spec.to_manifest() if spec else {},
                "serving_encoder": ctx.encoder.spec.to_manifest() if ctx.encoder else None,
                "admin_enabled": ctx.admin_token is not None,
                "limits": dataclasses.asdict(ctx.limits), "version_swaps": served.swaps}


@router.post("/neighbors", response_model=NeighboursResponse, responses=_POST,
             summary="the k nearest items of each query")
def neighbors(body: Query, ctx: ServingDep):
    with ctx.served.use() as mem:
        q = query_matrix(body, ctx, mem)
        nb = _search(mem.search, q, body.k, probe_shards=body.probe_shards,
                     probe_margin=body.probe_margin, where=item_filter(body))
        names = mem.class_names
        return {"version": mem.version, "neighbours": [neighbour_rows(nb, names, i) for i in range(len(q))]}


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=_POST,
             summary="classify each query by its neighbours' votes")
def classify(body: ClassifyQuery, ctx: ServingDep):
    with ctx.served.use() as mem:
        q = query_matrix(body, ctx, mem)
        res = _search(mem.classify, q, body.k, body.method, use_weights=body.use_weights,
                      alpha=body.alpha, tau=body.tau, xi=body.xi, probe_shards=body.probe_shards,
                      probe_margin=body.probe_margin, ties=body.ties,
                      abstain_below=body.abstain_below, where=item_filter(body))
        names = mem.class_names
        results = []
        for i, p in enumerate(res.predictions):
            results.append({
                "label": names[p] if p >= 0 else None, "label_index": int(p),
                "scores": {names[c]: float(res.scores[i, c]) for c in range(len(names))},
                "confidence": float(res.confidence[i]), "abstained": bool(res.abstained[i]),
                "neighbours": neighbour_rows(res.neighbours, names, i) if body.neighbours else None,
            })
        return {"version": mem.version, "method": body.method, "ties": body.ties, "k": body.k, "results": results}


def query_matrix(body: Query, ctx: Serving, mem: Memory) -> np.ndarray:
    """The request's queries as unit-norm float32 rows, or a 4xx naming what is wrong with them."""
    if (body.embeddings is None) == (body.images is None):
        raise error(422, "give exactly one of 'embeddings' or 'images'")
    n = len(body.embeddings if body.embeddings is not None else body.images)
    if n == 0:
        raise error(422, "no queries: the batch is empty")
    if n > ctx.limits.max_batch:
        raise error(422, f"batch of {n} queries exceeds the limit of {ctx.limits.max_batch} per request")
    if not 1 <= body.k <= ctx.limits.max_k:
        raise error(422, f"k must be between 1 and {ctx.limits.max_k}, got {body.k}")
    if len(mem) == 0:
        raise error(409, f"version {mem.version} of this memory has no live item: nothing to search")
    if body.images is not None:
        return _embed_images(body.images, ctx, mem)
    check_declared_encoder(body.encoder, mem)
    bad = next((i for i, row in enumerate(body.embeddings) if len(row) != mem.dim), None)
    if bad is not None:
        raise error(422, f"embeddings[{bad}] has {len(body.embeddings[bad])} values; this memory's "
                         f"dimension is {mem.dim}")
    return unit_rows(body.embeddings, "embeddings")


def unit_rows(rows, what: str) -> np.ndarray:
    """L2-normalised float32 rows of finite (the request models say so), non-zero vectors; a 422 names a zero row.

    Scaled in float64 by each row's largest magnitude first, so values beyond float32's range (or
    tiny enough to underflow it) keep their direction instead of overflowing or vanishing.
    """
    x = np.asarray(rows, dtype=np.float64)
    peak = np.abs(x).max(axis=1, keepdims=True)
    zero = np.flatnonzero(peak[:, 0] == 0)
    if len(zero):
        raise error(422, f"{what}[{int(zero[0])}] is the zero vector: it has no direction to compare")
    x = x / peak
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def check_declared_encoder(declared: EncoderDescription | None, mem: Memory) -> None:
    """409 when the sender says its embeddings come from another encoder than the memory's, both named."""
    spec = EncoderSpec.from_manifest(mem.manifest.encoder)
    if declared is None or spec is None:
        return
    try:
        spec.check_compatible(EncoderSpec(**declared.model_dump()))
    except ValueError as exc:
        raise error(409, f"the embeddings do not match this memory (its encoder first, theirs second): {exc}") \
            from None


def _embed_images(images: list[str], ctx: Serving, mem: Memory) -> np.ndarray:
    if ctx.encoder is None:
        raise error(422, "this server takes embeddings only: start it with --encoder NAME to send images")
    q = ctx.encoder.embed(images)
    if q.shape[1] != mem.dim:  # checked at start; a memory's dimension does not change
        raise error(409, f"encoder {ctx.encoder.spec.describe()} gives {q.shape[1]}-d embeddings; "
                         f"the memory is {mem.dim}-d")
    return q


def neighbour_rows(nb, names, i) -> list[dict]:
    """Query ``i``'s neighbours as response rows; empty slots (no item to fill them) are left out."""
    return [{"id": str(nb.ids[i, j]), "label": int(nb.labels[i, j]),
             "label_name": names[nb.labels[i, j]] if 0 <= nb.labels[i, j] < len(names) else None,
             "sim": float(nb.sims[i, j])}
            for j in range(nb.ids.shape[1]) if nb.ids[i, j] != ""]


def item_filter(body: Query) -> ItemFilter | None:
    """The request's ``include``/``exclude`` as a ``memory.filters.ItemFilter``, or a 422 naming the problem."""
    try:
        return ItemFilter.of(*(None if side is None else side.model_dump(exclude_none=True)
                               for side in (body.include, body.exclude)))
    except ValueError as exc:
        raise error(422, str(exc)) from exc


def _search(fn, *args, **kwargs):
    """Run a memory call; its ValueErrors (bad queries) become 422 answers."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise error(422, str(exc)) from exc
