"""The FastAPI app of ``vismem serve``: routers, middleware and lifespan wired together; uvicorn runs it."""
from __future__ import annotations

import contextlib
import logging
import socket

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.serving import admin, items, openapi, page, queries
from deploy.serving.admin import DEFAULT_ADD_BEAM_ARGS, MIN_TOKEN_CHARS, read_admin_token
from deploy.serving.dependencies import Serving
from deploy.serving.encoding import EncoderBox
from deploy.serving.errors import http_error, invalid_request, server_error
from deploy.serving.middleware import BodyLimit
from deploy.serving.models import Limits
from deploy.serving.served import LeaseKeeper, Poller, ServedMemory
from memory.encoder_spec import EncoderSpec

log = logging.getLogger("vismem.serve")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def create_app(memory_path: str, *, version: int | None = None, encoder: str | None = None,
               image_size: int | None = None, admin_token: str | None = None, poll_s: float = 2.0,
               limits: Limits = Limits(), add_beam_args=DEFAULT_ADD_BEAM_ARGS, lease_s: float = 600.0) -> FastAPI:
    """A FastAPI app serving the memory at ``memory_path`` (local or ``gs://``).

    Args:
        version: pin this version: no pickup of newer ones, admin changes refused (409).
        encoder: an encoder name (``pipelines.encoders``) to accept images as well as embeddings;
            loaded here and checked against the memory's encoder (name, version, image size,
            preprocessing). ``image_size`` defaults to the size the memory records for that encoder.
        admin_token: enables the admin endpoints for requests bearing it; None disables them.
        poll_s: how often to look for a newer version (<= 0: never; admin changes still swap).
        lease_s: the reader lease on the served version, renewed every ``lease_s / 3`` s (0: none).
        add_beam_args: Beam options of the ``add`` pipeline behind ``POST /v1/admin/items``.

    Raises:
        FileNotFoundError / MemoryFormatError: no readable memory at ``memory_path``.
        ValueError: a short admin token, or an encoder that is not the memory's (both named).
    """
    if admin_token is not None and len(admin_token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
    served = ServedMemory(memory_path, version=version, lease_s=lease_s)
    try:
        with served.use() as mem:
            facts = {"dim": mem.dim, "routed": bool(mem.manifest.partitioning.centroids)}
            enc = _encoder_for(mem, encoder, image_size) if encoder else None
    except BaseException:
        served.close()
        raise
    poller = Poller(served, poll_s) if poll_s > 0 and version is None else None
    keeper = LeaseKeeper(served) if lease_s > 0 else None
    app = FastAPI(
        title="vismem", version=_package_version(), lifespan=_lifespan(served, poller, keeper),
        description="Classification by retrieval from a visual memory: the k nearest (embedding, label) "
        "pairs and a voting rule decide; every answer carries its neighbours. Every error answer is an "
        "ErrorBody ({\"error\": message}).",
    )
    app.state.serving = Serving(memory_path, served, limits, enc, admin_token, tuple(add_beam_args))
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.include_router(queries.router)
    app.include_router(items.router)
    app.include_router(admin.router)
    app.include_router(page.router)
    openapi.install(app, limits=limits, images=enc is not None, **facts)
    return app


def _encoder_for(mem, name: str, image_size: int | None) -> EncoderBox:
    """The server's encoder, loaded now, refused unless it embeds images as the memory's items were."""
    known = EncoderSpec.from_manifest(mem.manifest.encoder)
    if image_size is None and known is not None and known.name == name:
        image_size = known.image_size  # the memory's own size, not the encoder's default
    box = EncoderBox(name, image_size)
    box.load()
    if known is not None:
        try:
            known.check_compatible(box.spec)
        except ValueError as exc:
            raise ValueError(f"--encoder does not match memory {mem.root} (the memory's encoder first, the "
                             f"server's second): {exc}") from None
    if box.dim != mem.dim:
        raise ValueError(f"--encoder {box.spec.describe()} gives {box.dim}-d embeddings; memory {mem.root} "
                         f"is {mem.dim}-d")
    return box


def _lifespan(served: ServedMemory, poller: Poller | None, keeper: LeaseKeeper | None):
    """Start the version poller and the lease keeper with the server; at shutdown stop them, close the version."""
    threads = [t for t in (poller, keeper) if t is not None]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for t in threads:
            t.start()
        try:
            yield
        finally:
            for t in threads:
                t.stop.set()
            for t in threads:
                t.join(5)
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
        ValueError: a non-loopback ``host`` without ``allow_remote``, a port outside 1..65535 or one
            that cannot be listened on (in use, no permission), or a bad admin token.
    """
    import uvicorn

    if host not in LOOPBACK and not allow_remote:
        raise ValueError(f"refusing to listen on {host}: that is reachable from other machines. Pass "
                         "--allow-remote to mean it (and put TLS and a token in front of admin endpoints)")
    token = read_admin_token(admin_token_file)
    sock = listen_socket(host, port)  # before the memory loads: a taken port fails in a second
    try:
        app = create_app(memory_path, admin_token=token, **app_kwargs)
        log.info("serving %s version %d on http://%s:%d (admin %s); the page: http://%s:%d/", memory_path,
                 app.state.serving.served.version, host, port, "enabled" if token else "disabled", host, port)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds it, failing with a one-line ValueError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {port!r}")
    sock = socket.socket(family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    return sock
