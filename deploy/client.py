"""A small Python client of ``vismem serve``: classify, neighbours, info, and the admin add/remove.

Example::

    from deploy.client import VismemClient
    with VismemClient("http://127.0.0.1:8000") as c:
        res = c.classify(query_embeddings, k=50, method="rank")
        res["results"][0]["label"], res["results"][0]["neighbours"][:3]
    with VismemClient("http://127.0.0.1:8000", token=os.environ["VISMEM_ADMIN_TOKEN"]) as admin:
        admin.remove(ids=["fmnist/train/123"], reason="GDPR request 42")
"""
from __future__ import annotations

import base64

import httpx
import numpy as np


class VismemError(RuntimeError):
    """An answer other than 2xx; ``status`` is the HTTP code, ``message`` the server's explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class VismemClient:
    """Talks to one server. ``token`` is only needed for the admin methods."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self):
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, path: str, body=None) -> dict:
        r = self._http.request(method, path, json=body)
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise VismemError(r.status_code, message)
        return r.json()

    def health(self) -> dict:
        return self._call("GET", "/v1/health")

    def info(self) -> dict:
        return self._call("GET", "/v1/info")

    @staticmethod
    def _queries(embeddings=None, images=None) -> dict:
        if (embeddings is None) == (images is None):
            raise ValueError("give exactly one of embeddings or images")
        if embeddings is not None:
            return {"embeddings": np.atleast_2d(np.asarray(embeddings, dtype=np.float32)).tolist()}
        return {"images": [base64.b64encode(b).decode() for b in images]}

    def classify(self, embeddings=None, *, images: list[bytes] | None = None, k: int = 50, method: str = "rank",
                 neighbours: bool = True, encoder: dict | None = None, **voting) -> dict:
        """``{version, method, ties, k, results}``, one result per query: ``{label, label_index, scores,
        confidence, abstained, neighbours}`` (``label`` left out when there is none: abstained, or no vote).

        ``images`` are encoded image files (PNG/JPEG bytes), for a server started with ``--encoder``;
        ``voting`` takes ``alpha``, ``tau``, ``xi``, ``use_weights``, ``ties``, ``abstain_below`` and
        ``probe_shards`` and ``probe_margin`` (k-means memories).
        ``encoder`` (``EncoderSpec.to_manifest()``) says how the embeddings were made: the server
        refuses them (409) when that differs from the memory's encoder.
        """
        body = {**self._queries(embeddings, images), "k": k, "method": method, "neighbours": neighbours, **voting}
        if encoder is not None:
            body["encoder"] = dict(encoder)
        return self._call("POST", "/v1/classify", body)

    def neighbors(self, embeddings=None, *, images: list[bytes] | None = None, k: int = 10,
                  probe_shards: int | None = None, probe_margin: float | None = None,
                  encoder: dict | None = None) -> dict:
        """``{version, neighbours: [[{id, label, label_name, sim}, ...], ...]}``, best first.

        ``probe_shards``: on a k-means memory, search only the P shards nearest each query;
        ``probe_margin``: visit the further ones only within this similarity margin of the nearest;
        ``encoder``: as in :meth:`classify`."""
        body = {**self._queries(embeddings, images), "k": k}
        for knob, value in (("probe_shards", probe_shards), ("probe_margin", probe_margin)):
            if value is not None:
                body[knob] = value
        if encoder is not None:
            body["encoder"] = dict(encoder)
        return self._call("POST", "/v1/neighbors", body)

    def add_items(self, ids, embeddings, labels, *, class_names=None, readmit: bool = False, sources=None) -> dict:
        """Add items (labels are class names) as a new version; returns the add's summary."""
        emb = np.asarray(embeddings, dtype=np.float32)
        items = [{"id": str(i), "embedding": e.tolist(), "label": str(lab)} for i, e, lab in zip(ids, emb, labels)]
        if sources is not None:
            for item, src in zip(items, sources):
                item["source"] = str(src)
        body = {"items": items, "readmit": readmit}
        if class_names is not None:
            body["class_names"] = list(class_names)
        return self._call("POST", "/v1/admin/items", body)

    def remove(self, *, ids=None, label: str | None = None, source: str | None = None,
               reason: str | None = None) -> dict:
        """Remove items by ids, class or source (exactly one) as a new version; durable on return."""
        body = {"ids": None if ids is None else [str(i) for i in ids], "label": label, "source": source,
                "reason": reason}
        return self._call("POST", "/v1/admin/remove", {k: v for k, v in body.items() if v is not None})
