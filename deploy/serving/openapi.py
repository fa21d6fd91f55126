"""The served OpenAPI schema: the memory's dimension and the server's limits written into the request models.

FastAPI derives the schema from the pydantic models, which cannot know the memory. This adds what a
client needs so that every request the schema allows is one the server accepts (checked by
``tests/test_serve_fuzz.py`` with schemathesis): rows of exactly ``dim`` numbers, not all zero; batches
of 1..max_batch; k in 1..max_k; ``images`` only on a server with an encoder; ``probe_shards`` only
on a k-means memory; exactly one selector of a removal. What no schema can say (ids unique within
an add, images that decode, a class the memory holds) is in the descriptions and answered 422 or
409.
"""
from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from deploy.serving.models import Limits

_FLOAT64_MAX = 1.7976931348623157e308  # JSON numbers beyond it are refused (no finite float holds them)
_DOC_KEYS = ("title", "description")  # not FastAPI's examples: they do not know the dimension


def install(app: FastAPI, *, dim: int, limits: Limits, images: bool, routed: bool) -> None:
    """Serve the schema with these facts (computed once, at the first ``/openapi.json``)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = tell_truth(schema, dim=dim, limits=limits, images=images, routed=routed)
        return app.openapi_schema

    app.openapi = openapi


def tell_truth(schema: dict, *, dim: int, limits: Limits, images: bool, routed: bool) -> dict:
    """A copy of FastAPI's ``schema`` with the memory's and the server's constraints filled in."""
    schema = copy.deepcopy(schema)
    models = schema["components"]["schemas"]
    finite = {"type": "number", "minimum": -_FLOAT64_MAX, "maximum": _FLOAT64_MAX}
    row = {"type": "array", "items": finite, "minItems": dim, "maxItems": dim,
           "contains": {"not": {"const": 0}}}  # at least one non-zero value: a direction to compare
    batch = {"minItems": 1, "maxItems": limits.max_batch}
    for name in ("Query", "ClassifyQuery"):
        model = models[name]
        props = model["properties"]
        props["k"].update(minimum=1, maximum=limits.max_k)
        if not routed:
            for knob in ("probe_shards", "probe_margin"):
                props[knob] = _doc(props[knob], type="null",
                                   description="only on k-means partitioned memories; this one is not")
        rows = {"type": "array", "items": row, **batch, "examples": [[[1.0] + [0.0] * (dim - 1)]]}
        if images:
            props["embeddings"] = _nullable(props["embeddings"], rows)
            props["images"] = _nullable(props["images"], {"type": "array", "items": {"type": "string"}, **batch})
            model["oneOf"] = [_present("embeddings", "array"), _present("images", "array")]
        else:
            props["embeddings"] = _doc(props["embeddings"], **rows)
            props["images"] = _doc(props["images"], type="null",
                                   description="this server takes embeddings only (start it with --encoder)")
            model["required"] = ["embeddings"]
    models["Item"]["properties"]["embedding"] = _doc(models["Item"]["properties"]["embedding"], **row)
    models.pop("HTTPValidationError", None)  # FastAPI's default 422 model: every error is an ErrorBody here
    models.pop("ValidationError", None)
    add = models["AddRequest"]["properties"]
    add["items"]["maxItems"] = limits.max_add_items
    add["class_names"] = _nullable(add["class_names"], {"type": "array", "items": {"type": "string", "minLength": 1},
                                                        "uniqueItems": True})
    remove = models["RemoveRequest"]
    remove["properties"]["ids"] = _nullable(remove["properties"]["ids"], {
        "type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": limits.max_remove_ids})
    remove["oneOf"] = [_present("ids", "array"), _present("label", "string"), _present("source", "string")]
    return schema


def _doc(prop: dict, **schema) -> dict:
    """``schema`` keeping the property's title and description (a description in ``schema`` wins)."""
    return {**{k: prop[k] for k in _DOC_KEYS if k in prop}, **schema}


def _nullable(prop: dict, schema: dict) -> dict:
    return _doc(prop, anyOf=[schema, {"type": "null"}])


def _present(name: str, kind: str) -> dict:
    """The branch of a ``oneOf`` where ``name`` is given (not null)."""
    return {"required": [name], "properties": {name: {"type": kind}}}
