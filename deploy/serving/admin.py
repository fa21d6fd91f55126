"""The admin endpoints (``/v1/admin/*``, bearer token): add items and remove them, each a new version."""
from __future__ import annotations

import hmac
import os
import shutil
import tempfile

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deploy.serving.dependencies import Serving, ServingDep
from deploy.serving.errors import ADMIN, BODY, COMMON, error
from deploy.serving.models import AddRequest, RemoveRequest
from deploy.serving.queries import check_declared_encoder, unit_rows
from memory.manifest import ConcurrentUpdate
from memory.items import ItemPolicy

TOKEN_ENV = "VISMEM_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16
# The server's own adds are small: one in-process worker starts in a second, a process pool does not.
DEFAULT_ADD_BEAM_ARGS = ("--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1")


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


# Declares the bearer scheme in the OpenAPI schema; the answers (401/403, one error model) are ours.
_bearer = HTTPBearer(auto_error=False, description="the server's admin token ($VISMEM_ADMIN_TOKEN or "
                     "--admin-token-file)")


def require_admin(ctx: ServingDep, cred: HTTPAuthorizationCredentials | None = Depends(_bearer)):
    """403 when the server has no admin token, 401 unless the request bears it, 409 on a pinned server."""
    if ctx.admin_token is None:
        raise error(403, f"admin endpoints are disabled: start the server with ${TOKEN_ENV} or "
                         "--admin-token-file to enable them")
    if cred is None or not cred.credentials:
        raise HTTPException(401, "admin endpoints need 'Authorization: Bearer TOKEN'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(cred.credentials.strip().encode(), ctx.admin_token.encode()):
        raise HTTPException(401, "invalid admin token", headers={"WWW-Authenticate": "Bearer"})
    if ctx.served.pinned:
        # A pin promises one fixed version; a change this server would not serve is refused, not published.
        raise error(409, f"this server is pinned to version {ctx.served.version} (--version): it publishes no "
                         "changes; send admin requests to a server that follows the latest version")


router = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_admin)],
                   responses={**COMMON, **BODY, **ADMIN})


@router.post("/items", summary="add items as a new version (bearer token)")
def add_items(body: AddRequest, ctx: ServingDep) -> dict:
    if len(body.items) > ctx.limits.max_add_items:
        raise error(422, f"{len(body.items)} items exceed the limit of {ctx.limits.max_add_items} per request")
    with ctx.admin_lock:
        with ctx.served.use() as mem:
            dim, names = mem.dim, list(mem.class_names)
            check_declared_encoder(body.encoder, mem)
        names = list(body.class_names) if body.class_names else names
        bad = next((i for i, it in enumerate(body.items) if len(it.embedding) != dim), None)
        if bad is not None:
            raise error(422, f"items[{bad}].embedding has {len(body.items[bad].embedding)} values; "
                             f"this memory's dimension is {dim}")
        unknown = sorted({it.label for it in body.items} - set(names))
        if unknown:
            raise error(409, f"unknown class(es) {unknown[:5]}; known: {names[:20]}; pass class_names "
                             "(the memory's classes followed by the new ones) to add classes")
        return _served_at_once(ctx, _run_add(ctx.memory_path, body, names, dim, ctx.add_beam_args))


@router.post("/remove", summary="remove items (unlearning) as a new version (bearer token)")
def remove(body: RemoveRequest, ctx: ServingDep) -> dict:
    from memory.mutations import remove_items

    given = [x for x in (body.ids, body.label, body.source) if x is not None]
    if len(given) != 1:
        raise error(422, "give exactly one of 'ids', 'label' or 'source'")
    if body.ids is not None and not body.ids:
        raise error(422, "'ids' is empty: nothing to remove")
    if body.ids is not None and len(body.ids) > ctx.limits.max_remove_ids:
        raise error(422, f"{len(body.ids)} ids exceed the limit of {ctx.limits.max_remove_ids} per request")
    with ctx.admin_lock:
        try:
            result = remove_items(ctx.memory_path, ids=body.ids, label=body.label, source=body.source,
                                  reason=body.reason)
        except ValueError as exc:  # well formed, but not for this memory: an unknown class or source
            raise error(409, str(exc)) from exc
        except ConcurrentUpdate as exc:
            raise error(409, f"{exc}; send the request again") from exc
        return _served_at_once(ctx, result)


def _served_at_once(ctx: Serving, result: dict) -> dict:
    """Swap the published version in before answering, so a removed item is never served after a 200."""
    try:
        ctx.served.refresh()
    except Exception as exc:  # noqa: BLE001 - published, but this server cannot serve it yet: say so
        raise error(503, f"version {result['version']} was published but this server could not open it "
                         f"({type(exc).__name__}: {exc}); it serves version {ctx.served.version} until its "
                         "next check") from exc
    if ctx.served.version < result["version"]:
        raise error(503, f"version {result['version']} was published but this server still serves version "
                         f"{ctx.served.version}")
    return result


def _run_add(memory_path: str, body: AddRequest, names: list, dim: int, beam_args) -> dict:
    """Check the items with the memory's item policy, stage them as an embedding shard, run ``add`` on it."""
    from memory import schema
    from pipelines.build import BuildFailed, add_to_memory

    ids = np.asarray([it.id for it in body.items], dtype=object)
    labels = np.asarray([names.index(it.label) for it in body.items], dtype=np.int64)
    n = len(ids)
    prov = {"label_source": np.full(n, "human", dtype=object), "confidence": np.ones(n, np.float32),
            "source": np.asarray([it.source for it in body.items], dtype=object),
            "uri": np.asarray([it.uri for it in body.items], dtype=object)}
    emb = unit_rows([it.embedding for it in body.items], "items[].embedding")
    policy = ItemPolicy(dim, len(names), norm_tolerance=None)
    try:
        emb = policy.admit(ids, emb, labels, label_sources=prov["label_source"])
    except ValueError as exc:
        raise error(422, str(exc)) from exc
    staging = tempfile.mkdtemp(prefix="vismem-serve-add-")
    try:
        path = os.path.join(staging, "staged.parquet")
        schema.write_embeddings(path, schema.embedding_table(ids, emb, labels, provenance=prov))
        try:
            return add_to_memory(memory_path, path, class_names=names, readmit=body.readmit,
                                 pipeline_args=list(beam_args))
        except (BuildFailed, ValueError) as exc:  # ids the memory holds or forgot, a class list it does not start
            raise error(409, str(exc)) from exc
        except ConcurrentUpdate as exc:
            raise error(409, f"{exc}; send the request again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
