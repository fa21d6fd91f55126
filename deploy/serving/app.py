"""The FastAPI app of ``vismem serve``: routers, middleware and lifespan wired together; uvicorn runs it."""
from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.serving import admin, queries
from deploy.serving.admin import DEFAULT_ADD_BEAM_ARGS, MIN_TOKEN_CHARS, read_admin_token
from deploy.serving.dependencies import Serving
from deploy.serving.encoding import EncoderBox
from deploy.serving.errors import http_error, invalid_request
from deploy.serving.middleware import BodyLimit
from deploy.serving.models import Limits
from deploy.serving.served import Poller, ServedMemory

log = logging.getLogger("vismem.serve")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


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
    poller = Poller(served, poll_s) if poll_s > 0 and version is None else None
    enc = EncoderBox(encoder, image_size) if encoder else None
    app = FastAPI(
        title="vismem", version=_package_version(), lifespan=_lifespan(served, poller),
        description="Classification by retrieval from a visual memory: the k nearest (embedding, label) "
        "pairs and a voting rule decide; every answer carries its neighbours.",
    )
    app.state.serving = Serving(memory_path, served, limits, enc, admin_token, tuple(add_beam_args))
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(queries.router)
    app.include_router(admin.router)
    return app


def _lifespan(served: ServedMemory, poller: Poller | None):
    """Start the version poller with the server; at shutdown stop it and close the served version."""
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

    return lifespan


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("vismem")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "0+source"


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
    log.info("serving %s version %d on http://%s:%d (admin %s)", memory_path, app.state.serving.served.version,
             host, port, "enabled" if token else "disabled")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
