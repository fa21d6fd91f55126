"""``vismem serve``'s page files and item routes over real HTTP: ``GET /``, ``/v1/items/{id}`` and its image.

The memory's items come from every source kind ``memory.uris`` knows (an IDX row, image files, a
WebDataset tar, a Parquet file) plus items whose image cannot be had (no uri, a missing file, a file
that is not an image), so every answer of the image route is seen once. No browser here: the page
itself is driven in Chromium by ``test_serve_page.py``.
"""
import ast
import fnmatch
import gc
import io
import os
import tarfile

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import clustered
from deploy.serving import create_app, items
from memory import uris, write_memory
from memory.idx import write_idx
from test_serve import Running

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "items-token-0123456789abc"
DIM = 8


def _encoded(seed: int, fmt: str, size=(20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("items")
    digits = np.random.default_rng(1).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    idx_path = str(tmp / "t-images-idx3-ubyte.gz")
    write_idx(idx_path, digits)
    files = {"a.png": _encoded(1, "PNG"), "b.jpg": _encoded(2, "JPEG"), "c.tif": _encoded(3, "TIFF"),
             "d.png": b"not an image at all"}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    with tarfile.open(tmp / "shard.tar", "w") as tar:
        data = _encoded(4, "PNG")
        info = tarfile.TarInfo("s000.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": [_encoded(5, "PNG"), _encoded(6, "PNG")]}), str(tmp / "images.parquet"))
    items = {  # id -> uri: ids with slashes as real data sets name them
        "fmnist/train/0": uris.idx_uri(idx_path, 0), "fmnist/train/3": uris.idx_uri(idx_path, 3),
        "folder/a": str(tmp / "a.png"), "folder/b": str(tmp / "b.jpg"), "folder/c": str(tmp / "c.tif"),
        "folder/not-image": str(tmp / "d.png"), "folder/missing": str(tmp / "gone.png"),
        "wds/s000": uris.tar_uri(str(tmp / "shard.tar"), "s000"),
        "pq/1": uris.parquet_uri(str(tmp / "images.parquet"), 1), "pq/9": uris.parquet_uri(str(tmp / "images.parquet"), 9),
        "no-uri": "",
    }
    ids = list(items) + [f"plain-{i}" for i in range(9)]
    x, labels = clustered(len(ids), DIM, 2, seed=2)
    root = str(tmp / "mem")
    write_memory(root, x, labels, ids, num_shards=3, class_names=["odd", "even"],
                 provenance={"uri": np.array([items.get(i, "") for i in ids], dtype=object),
                             "source": np.array(["test"] * len(ids), dtype=object)})
    with Running(create_app(root, admin_token=TOKEN, poll_s=0)) as srv:
        srv.root, srv.x, srv.labels, srv.ids, srv.digits, srv.files, srv.tmp = root, x, labels, ids, digits, files, tmp
        yield srv


def _get(srv, path, **params):
    return httpx.get(srv.url + path, params=params or None, timeout=30)


def test_item_images_of_every_source_kind_are_served(server):
    r = _get(server, "/v1/items/fmnist/train/3/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), server.digits[3])
    # Encoded files a browser shows are sent as they are; others (TIFF) as PNG.
    for item, media, same in (("folder/a", "image/png", "a.png"), ("folder/b", "image/jpeg", "b.jpg"),
                              ("folder/c", "image/png", None)):
        r = _get(server, f"/v1/items/{item}/image")
        assert r.status_code == 200 and r.headers["content-type"] == media, (item, r.text)
        if same:
            assert r.content == server.files[same]
        else:
            assert Image.open(io.BytesIO(r.content)).size == (20, 14)
    r = _get(server, "/v1/items/wds/s000/image")
    assert r.status_code == 200 and r.content == _encoded(4, "PNG")
    r = _get(server, "/v1/items/pq/1/image")
    assert r.status_code == 200 and r.content == _encoded(6, "PNG")
    # A URL-encoded id (as the page sends it) names the same item.
    assert _get(server, "/v1/items/wds%2Fs000/image").content == _encoded(4, "PNG")
    # A thumbnail: shrunk to fit, aspect kept, never enlarged.
    thumb = _get(server, "/v1/items/folder/a/image", size=16)
    assert thumb.headers["content-type"] == "image/png" and Image.open(io.BytesIO(thumb.content)).size == (16, 11)
    assert Image.open(io.BytesIO(_get(server, "/v1/items/fmnist/train/0/image", size=64).content)).size == (8, 8)


def test_an_item_without_a_retrievable_image_is_a_404_that_says_why(server):
    cases = {"no-uri": "has no image: its provenance names no uri",
             "folder/missing": "cannot be read from",
             "folder/not-image": "is not an image that can be shown",
             "pq/9": "the file has 2 rows",
             "never-added": "no live item 'never-added' in version 1"}
    for item, words in cases.items():
        r = _get(server, f"/v1/items/{item}/image")
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", (item, r.text)
        assert words in r.json()["error"], (item, r.text)
    for size in (0, 15, 1025, "big"):
        r = _get(server, "/v1/items/folder/a/image", size=size)
        assert r.status_code == 422 and "size" in r.json()["error"], r.text


def test_an_item_answers_its_label_provenance_and_stored_embedding(server):
    i = server.ids.index("folder/b")
    got = _get(server, "/v1/items/folder/b").json()
    assert got["id"] == "folder/b" and got["version"] == 1 and got["label"] == int(server.labels[i])
    assert got["label_name"] == ["odd", "even"][server.labels[i]] and got["source"] == "test"
    assert got["uri"] == str(server.tmp / "b.jpg") and got["has_image"] is True and got["weight"] == 1.0
    np.testing.assert_allclose(got["embedding"], server.x[i], atol=1e-6)
    assert _get(server, "/v1/items/no-uri").json()["has_image"] is False
    r = _get(server, "/v1/items/nothing-here")
    assert r.status_code == 404 and "no live item 'nothing-here'" in r.json()["error"]


def test_a_removed_item_and_its_image_are_gone(server):
    assert _get(server, "/v1/items/plain-0").status_code == 200
    r = httpx.post(server.url + "/v1/admin/remove", json={"ids": ["plain-0", "folder/a"]},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200 and r.json()["removed"] == 2
    for path in ("/v1/items/plain-0", "/v1/items/folder/a/image"):
        r = _get(server, path)
        assert r.status_code == 404 and "(never added, or removed)" in r.json()["error"] and "version 2" in r.json()["error"]
    assert _get(server, "/v1/items/folder/b/image").status_code == 200  # the others are still served
    # The lookup built for version 1 went with it: nothing keeps a retired version's index alive.
    gc.collect()
    assert sorted(m.version for m in list(items._indices) if m.root == server.root) == [2]


def test_the_page_is_served_and_ships_with_the_package(server):
    r = _get(server, "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for words in ('<label for="image-file"', '<label for="item-id"', '<label for="method"', '<label for="k"',
                  '<label for="ties"', '<label for="admin-token"', 'id="neighbours"', 'role="alert"',
                  '<script src="page.js" defer></script>', 'href="page.css"'):
        assert words in page, words
    assert "http" not in page.replace('http-equiv', '')  # nothing from another host
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        r = _get(server, "/" + name)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 500
    assert "/" not in _get(server, "/openapi.json").json()["paths"]  # the API schema stays the API's
    # setup.py's package_data ships every static file (a non-editable install has no source tree).
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))["deploy"]
    static = os.path.join(ROOT, "deploy", "serving", "static")
    for name in os.listdir(static):
        assert any(fnmatch.fnmatch(f"serving/static/{name}", g) for g in data), name
