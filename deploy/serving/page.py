"""The page at ``/``: classify an uploaded image or a stored item, see why, change the vote, remove a neighbour.

Plain HTML, CSS and a little JavaScript from ``deploy/serving/static`` (package data), served as they
are: nothing to build, nothing fetched from elsewhere (the Content-Security-Policy allows this server
only). The page speaks the public API (``/v1/info``, ``/v1/classify``, ``/v1/items``,
``/v1/admin/remove``) as any client would, with the admin token the person types in.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)
# The page's own files; images also come from blob: (an uploaded file's preview).
CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
FILES = {"": ("index.html", "text/html; charset=utf-8"), "page.js": ("page.js", "text/javascript; charset=utf-8"),
         "page.css": ("page.css", "text/css; charset=utf-8")}


def static_file(name: str) -> bytes:
    return resources.files("deploy.serving").joinpath("static", name).read_bytes()


def _route(path: str, name: str, media: str):
    def serve_file() -> Response:
        return Response(static_file(name), media_type=media,
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})

    router.add_api_route("/" + path, serve_file, methods=["GET"], name=f"page:{name}")


for _path, (_name, _media) in FILES.items():
    _route(_path, _name, _media)
