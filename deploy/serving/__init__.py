"""HTTP serving of a memory: classify and neighbours for applications, admin add/remove, version pickup.

``create_app(memory_path, ...)`` returns a FastAPI app; ``vismem serve`` runs it with uvicorn on
127.0.0.1 unless told otherwise. Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

    GET  /                     the page: classify an upload or an item, see why, vote again, remove    page.py
    GET  /v1/health            liveness + the version being served               queries.py
    GET  /v1/info              version, live item count, dimension, classes, shards, limits
    POST /v1/classify          embeddings (or base64 images with --encoder) -> label, scores, neighbours
    POST /v1/neighbors         embeddings (or images) -> the k nearest items
    GET  /v1/items/{id}        a live item: label, provenance, stored embedding         items.py
    GET  /v1/items/{id}/image  its image, from its provenance uri (any source kind); 404 says why not
    POST /v1/admin/items       add items (a Beam ``add`` publishing a new version)      bearer token, admin.py
    POST /v1/admin/remove      remove items (unlearning; a new version, durable at once)  bearer token

Versions (served.py): a background thread checks ``latest_version`` every ``poll_s`` seconds; a newer
version is opened beside the current one and swapped in atomically. Requests already running finish
on the version they started with (it is closed when its last request ends), so no request is dropped.
Admin changes swap the new version in before they answer: a removed item is never served again.
A server pinned with ``version=N`` serves N only and refuses admin changes (409). Every server
renews a reader lease on the version it serves on its own timer, so ``vismem gc`` keeps its files.
Every error answer is one JSON model (errors.py); the OpenAPI schema carries the memory's dimension
and the server's limits (openapi.py).
"""
from deploy.serving.admin import read_admin_token
from deploy.serving.app import create_app, serve
from deploy.serving.models import Limits
from deploy.serving.served import ServedMemory

__all__ = ["Limits", "ServedMemory", "create_app", "read_admin_token", "serve"]
