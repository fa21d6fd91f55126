"""Error answers: every error status carries one JSON model, ``{"error": message}``, naming the problem."""
from __future__ import annotations

import logging

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vismem.serve")


class Problem(BaseModel):
    """One field that failed the request model (422 only)."""

    type: str = Field(description="pydantic's error type, e.g. missing, extra_forbidden, finite_number")
    loc: list[str | int] = Field(description="where in the request, e.g. [\"body\", \"embeddings\", 0]")
    msg: str


class ErrorBody(BaseModel):
    """The body of every error answer (4xx and 5xx)."""

    error: str = Field(description="what is wrong, in one line")
    detail: list[Problem] | None = Field(None, description="422 for a body that fails the request model: "
                                                           "the failing fields (at most 20)")


def _doc(text: str, headers: dict | None = None) -> dict:
    out = {"model": ErrorBody, "description": text}
    if headers:
        out["headers"] = headers
    return out


_BEARER = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
# Statuses any endpoint may answer; each route adds its own. Every one documents ErrorBody.
COMMON = {500: _doc("an unexpected server error (a bug; the server log has its traceback)")}
BODY = {
    400: _doc("malformed JSON"),
    413: _doc("the body exceeds the server's byte limit (--max-body-mb)"),
    422: _doc("the body does not match the request model, or the server cannot use it (e.g. an undecodable "
              "image)"),
}
QUERY = {409: _doc("the memory cannot answer: it has no live item, or a declared encoder differs from the "
                   "memory's (both named)")}
ITEM = {
    404: _doc("no live item has this id in the served version (never added, or removed), or the item has no "
              "image that can be read and shown (the reason is named)"),
    422: _doc("a query parameter out of range"),
}
ADMIN = {
    401: _doc("no or a wrong 'Authorization: Bearer TOKEN' header", _BEARER),
    403: _doc("admin endpoints are disabled: the server has no admin token"),
    409: _doc("the change conflicts with the memory's state: a pinned server (--version), an unknown class, "
              "an id removed before (pass readmit), a class list that does not extend the memory's, a "
              "concurrent change that could not be merged"),
    503: _doc("the change was published but this server could not open the new version yet"),
}


def error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON is a 400; a body that fails the models is a 422 listing (up to) five problems."""
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
    detail = [Problem(type=str(e.get("type", "")), loc=[x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
                      msg=str(e.get("msg", ""))).model_dump() for e in errors[:20]]
    return JSONResponse({"error": "invalid request: " + "; ".join(parts) + more, "detail": detail}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered as JSON like every other error (no internals in the body)."""
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"},
                        status_code=500)
