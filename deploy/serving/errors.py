"""Error answers: every 4xx carries ``{"error": message}`` naming the problem."""
from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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
    return JSONResponse({"error": "invalid request: " + "; ".join(parts) + more, "detail": _jsonable(errors[:20])},
                        status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _jsonable(errors):
    return [{k: (v if isinstance(v, (str, int, float, bool, list, type(None))) else str(v))
             for k, v in e.items() if k != "input"} for e in errors]
