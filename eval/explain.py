"""Interpretability (section 3.7, Figures 4, 6, 14): an HTML page that shows why each query got its label.

For each chosen query: the query image, its nearest neighbours' images with labels, similarities
and vote weights, the class scores and the decision; and, for compositionality, the neighbours of
the residual ``query - nearest neighbour``. Images are embedded as data URIs so the page is one
self-contained file; a small script marks the page once every image has loaded.
"""
from __future__ import annotations

import base64
import functools
import html
import io

import numpy as np

from memory import manifest as mf
from memory import storage, voting
from memory.memory import Memory
from memory.shard import read_items, read_vectors


def resolve_image(uri: str) -> bytes | None:
    """PNG/JPEG bytes of an item's ``uri``: ``IDX_FILE#row`` (MNIST family) or an image file/URL."""
    if not uri:
        return None
    try:
        if "#" in uri:
            path, row = uri.rsplit("#", 1)
            return _png(_idx_array(path)[int(row)]) if "idx" in path else None
        return storage.read_bytes(uri)
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=4)
def _idx_array(path: str) -> np.ndarray:
    from pipelines.sources import read_idx

    return read_idx(path)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def item_locations(memory_path: str, version: int | None = None) -> dict:
    """``{item id: (shard entry, row, uri)}`` over every shard of a memory version."""
    manifest = mf.read_manifest(memory_path, version)
    out = {}
    for entry in manifest["shards"]:
        t = read_items(memory_path, entry, columns=["id", "uri"])
        for row, (item, uri) in enumerate(zip(t.column("id").to_pylist(), t.column("uri").to_pylist())):
            out[item] = (entry, row, uri)
    return out


def _img(data: bytes | None, alt: str, size: int = 84) -> str:
    if data is None:
        return f'<div class="noimg" style="width:{size}px;height:{size}px">no image<br>{html.escape(alt)}</div>'
    mime = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
    src = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return f'<img src="{src}" alt="{html.escape(alt)}" width="{size}" height="{size}">'


_STYLE = """
body{font-family:sans-serif;margin:20px;color:#222} .q{border:1px solid #ccc;margin:14px 0;padding:10px}
.row{display:flex;flex-wrap:wrap;gap:8px} .nb{text-align:center;font-size:11px;width:96px}
.right{color:#0a0} .wrong{color:#c00} img{image-rendering:pixelated;border:1px solid #999}
.noimg{display:inline-block;background:#eee;font-size:9px;overflow:hidden} table{border-collapse:collapse}
td,th{padding:2px 6px;border-bottom:1px solid #ddd;font-size:12px}
"""
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var m = document.getElementById('rendered');
  m.setAttribute('data-rendered', ok + '/' + imgs.length);
  m.textContent = ok + ' of ' + imgs.length + ' images rendered';
});
"""


def _neighbour_images(nb, j, uris: dict, resolver):
    """``(column, image bytes or None)`` of query ``j``'s valid neighbours (excluded ones skipped)."""
    for i in range(nb.ids.shape[1]):
        if nb.labels[j, i] >= 0:
            yield i, resolver(uris.get(nb.ids[j, i], ""))


def explain_page(memory_path: str, queries: dict, out_html: str, *, rows=None, k: int = 10,
                 method: str = "rank", alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0,
                 residual_k: int = 5, misclassified: int = 0, resolver=resolve_image) -> dict:
    """Write the page for ``rows`` of ``queries`` (and/or the first ``misclassified`` mistakes).

    ``queries`` is :func:`memory.schema.read_embeddings` output (ids, embeddings, labels, provenance).
    Returns ``{"queries": n, "images": n_images, "path": out_html}``.
    """
    rows = list(rows or [])
    with Memory.open(memory_path) as mem:
        names = mem.class_names
        where = item_locations(memory_path, mem.version)
        uris = {item: loc[2] for item, loc in where.items()}
        emb = queries["embeddings"]
        if misclassified:
            res = mem.classify(emb, k, method, alpha=alpha, tau=tau, xi=xi)
            wrong = np.flatnonzero((res.predictions != queries["labels"]) & (queries["labels"] >= 0))
            rows += [int(r) for r in wrong[:misclassified] if r not in rows]
        if not rows:
            raise ValueError("choose queries to explain: give rows and/or misclassified > 0")
        sel = emb[rows] / np.linalg.norm(emb[rows], axis=1, keepdims=True)
        res = mem.classify(sel, k, method, alpha=alpha, tau=tau, xi=xi)
        nb = res.neighbours
        w = voting.neighbour_weights(nb.labels, nb.sims.astype(np.float64), method=method,
                                     weights=nb.weights, alpha=alpha, tau=tau, xi=xi)
        # Compositionality (Figure 14): what remains of the query once its nearest neighbour is removed.
        nearest = np.concatenate([read_vectors(memory_path, where[i][0], [where[i][1]]) for i in nb.ids[:, 0]])
        residual = sel - nearest
        ok = np.linalg.norm(residual, axis=1) > 1e-6
        res_nb = mem.search(np.where(ok[:, None], residual, sel), residual_k)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vismem: why these labels</title>"
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>Why these labels</h1><p>Memory <code>{html.escape(memory_path)}</code>, {method} voting, "
             f"k = {k}. <span id='rendered' data-rendered=''>loading…</span></p>"]
    images = 0
    for j, r in enumerate(rows):
        truth = int(queries["labels"][r])
        pred = int(res.predictions[j])
        verdict = "right" if pred == truth else "wrong"
        qimg = resolver(str(queries["provenance"]["uri"][r]))
        images += qimg is not None
        parts.append(f"<div class='q'><div class='row'><div class='nb' style='width:120px'>{_img(qimg, str(queries['ids'][r]), 112)}"
                     f"<br><b>query</b><br>{html.escape(str(queries['ids'][r]))}</div><div>"
                     f"<p>decision: <b class='{verdict}'>{html.escape(names[pred]) if pred >= 0 else 'none'}</b>"
                     f" (true: {html.escape(names[truth]) if truth >= 0 else 'unknown'})</p><table>"
                     "<tr><th>class</th><th>score</th></tr>")
        top = np.argsort(-res.scores[j])[:3]
        parts += [f"<tr><td>{html.escape(names[c])}</td><td>{res.scores[j, c]:.4f}</td></tr>" for c in top]
        parts.append("</table></div></div><p>nearest neighbours (label, similarity, vote weight):</p><div class='row'>")
        for i, data in _neighbour_images(nb, j, uris, resolver):
            images += data is not None
            cls = "right" if nb.labels[j, i] == truth else "wrong"
            parts.append(f"<div class='nb'>{_img(data, nb.ids[j, i])}<br><span class='{cls}'>"
                         f"{html.escape(names[nb.labels[j, i]])}</span><br>s={nb.sims[j, i]:.3f} w={w[j, i]:.3f}</div>")
        parts.append("</div><p>neighbours of the residual (query − nearest neighbour):</p><div class='row'>")
        for i, data in _neighbour_images(res_nb, j, uris, resolver):
            images += data is not None
            parts.append(f"<div class='nb'>{_img(data, res_nb.ids[j, i])}<br>"
                         f"{html.escape(names[res_nb.labels[j, i]])}<br>s={res_nb.sims[j, i]:.3f}</div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    storage.write_bytes_atomic(out_html, "\n".join(parts).encode())
    return {"queries": len(rows), "images": images, "path": out_html}
