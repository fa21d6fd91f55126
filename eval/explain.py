"""Interpretability (section 3.7, Figures 4, 6, 14): an HTML page that shows why each query got its label.

For each chosen query: the query image, its nearest neighbours' images with labels, similarities
and vote weights, the class scores and the decision; and, for compositionality, the neighbours of
the residual ``query - nearest neighbour``. Images are embedded as data URIs so the page is one
self-contained file; a small script marks the page once every image has loaded.
"""
from __future__ import annotations

import base64
import html

import numpy as np

from eval import images
from memory import storage, voting
from memory.memory import Memory
from memory.shard import read_vectors


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


def explain_page(memory_path: str, queries: dict, out_html: str, *, rows=None, k: int = 10,
                 method: str = "rank", alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0,
                 residual_k: int = 5, misclassified: int = 0) -> dict:
    """Write the page for ``rows`` of ``queries`` (and/or the first ``misclassified`` mistakes).

    ``queries`` is :func:`memory.schema.read_embeddings` output (ids, embeddings, labels, provenance).
    Returns ``{"queries": n, "images": n_images, "path": out_html}``.
    """
    vote = {"method": method, "alpha": alpha, "tau": tau, "xi": xi}
    with Memory.open(memory_path) as mem:
        names = mem.class_names
        rows = _choose_rows(mem, queries, list(rows or []), k, misclassified, vote)
        res, weights, res_nb, where = _explain(mem, memory_path, queries["embeddings"][rows], k, residual_k, vote)
    uris = {item: loc[2] for item, loc in where.items()}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vismem: why these labels</title>"
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>Why these labels</h1><p>Memory <code>{html.escape(memory_path)}</code>, {method} voting, "
             f"k = {k}. <span id='rendered' data-rendered=''>loading…</span></p>"]
    count = 0
    for j, r in enumerate(rows):
        html_j, n = _query_html(j, r, queries, names, res, weights, res_nb, uris)
        parts.append(html_j)
        count += n
    parts.append("</body></html>")
    storage.write_bytes_atomic(out_html, "\n".join(parts).encode())
    return {"queries": len(rows), "images": count, "path": out_html}


def _choose_rows(mem, queries, rows: list, k: int, misclassified: int, vote: dict) -> list:
    """``rows`` followed by the first ``misclassified`` labelled queries the memory gets wrong."""
    if misclassified:
        res = mem.classify(queries["embeddings"], k, **vote)
        wrong = np.flatnonzero((res.predictions != queries["labels"]) & (queries["labels"] >= 0))
        rows += [int(r) for r in wrong[:misclassified] if r not in rows]
    if not rows:
        raise ValueError("choose queries to explain: give rows and/or misclassified > 0")
    return rows


def _explain(mem, memory_path: str, emb, k: int, residual_k: int, vote: dict):
    """The classification, vote weights and residual neighbours of the chosen queries."""
    where = images.item_locations(memory_path, mem.version)
    sel = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    res = mem.classify(sel, k, **vote)
    nb = res.neighbours
    weights = voting.neighbour_weights(nb.labels, nb.sims.astype(np.float64), weights=nb.weights, **vote)
    # Compositionality (Figure 14): what remains of the query once its nearest neighbour is removed.
    nearest = np.concatenate([read_vectors(memory_path, where[i][0], [where[i][1]]) for i in nb.ids[:, 0]])
    residual = sel - nearest
    ok = np.linalg.norm(residual, axis=1) > 1e-6
    return res, weights, mem.search(np.where(ok[:, None], residual, sel), residual_k), where


def _query_html(j: int, r: int, queries, names, res, weights, res_nb, uris: dict) -> tuple[str, int]:
    """``(html, images shown)`` of one query: its image, decision, neighbours and residual neighbours."""
    nb = res.neighbours
    truth, pred = int(queries["labels"][r]), int(res.predictions[j])
    qid = str(queries["ids"][r])
    qimg = images.image_bytes(str(queries["provenance"]["uri"][r]))
    count = qimg is not None
    parts = [f"<div class='q'><div class='row'><div class='nb' style='width:120px'>{_img(qimg, qid, 112)}"
             f"<br><b>query</b><br>{html.escape(qid)}</div><div>"
             f"<p>decision: <b class='{'right' if pred == truth else 'wrong'}'>"
             f"{html.escape(names[pred]) if pred >= 0 else 'none'}</b>"
             f" (true: {html.escape(names[truth]) if truth >= 0 else 'unknown'})</p><table>"
             "<tr><th>class</th><th>score</th></tr>"]
    parts += [f"<tr><td>{html.escape(names[c])}</td><td>{res.scores[j, c]:.4f}</td></tr>"
              for c in np.argsort(-res.scores[j])[:3]]
    parts.append("</table></div></div><p>nearest neighbours (label, similarity, vote weight):</p><div class='row'>")
    for i, data in _neighbour_images(nb, j, uris):
        count += data is not None
        cls = "right" if nb.labels[j, i] == truth else "wrong"
        parts.append(f"<div class='nb'>{_img(data, nb.ids[j, i])}<br><span class='{cls}'>"
                     f"{html.escape(names[nb.labels[j, i]])}</span><br>s={nb.sims[j, i]:.3f} w={weights[j, i]:.3f}</div>")
    parts.append("</div><p>neighbours of the residual (query − nearest neighbour):</p><div class='row'>")
    for i, data in _neighbour_images(res_nb, j, uris):
        count += data is not None
        parts.append(f"<div class='nb'>{_img(data, res_nb.ids[j, i])}<br>"
                     f"{html.escape(names[res_nb.labels[j, i]])}<br>s={res_nb.sims[j, i]:.3f}</div>")
    parts.append("</div></div>")
    return "\n".join(parts), int(count)


def _neighbour_images(nb, j, uris: dict):
    """``(column, image bytes or None)`` of query ``j``'s valid neighbours (excluded ones skipped)."""
    for i in range(nb.ids.shape[1]):
        if nb.labels[j, i] >= 0:
            yield i, images.image_bytes(uris.get(nb.ids[j, i], ""))
