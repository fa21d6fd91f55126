"""The page of ``vismem serve`` driven in headless Chromium (Selenium), as a person uses it.

A real memory of Fashion-MNIST images (trousers, sneakers, bags) embedded with EfficientNet-Lite0,
its items' images spread over every source kind (IDX rows, PNG files, a WebDataset tar, a Parquet
file) and one item without an image. The known answer: the uploaded sneaker has a twin in the
memory, mislabelled "bag", so at k = 1 the page says "bag"; removing that neighbour with the admin
token makes it a sneaker. Every decision the page shows is checked against the HTTP API and against
``Memory.classify`` with the same settings.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make data`` installs both) and ``selenium``
(the ``test`` extras); a missing one fails the test with its name, it is never skipped.
"""
import io
import os
import tarfile

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deploy.client import VismemClient
from deploy.serving import create_app
from memory import Memory, uris, write_memory
from test_serve import Running

TOKEN = "page-token-0123456789abcdef"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZE = 32  # encoder input pixels: small enough for this CPU, real enough to separate the classes
KEEP = {1: "trouser", 7: "sneaker", 8: "bag"}  # Fashion-MNIST class index -> this memory's class
CLASSES = list(KEEP.values())
PER_CLASS = 24
TWIN, NO_IMAGE = "upload-twin", "no-image/sneaker"
WAIT_S = 90  # a loaded two-core machine: Chromium's first page and a model forward pass can be slow


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _browser(tmp_path):
    """Headless Chromium under Debian's chromedriver (no driver download: there is no network)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: this test drives Debian's chromium with its "
                    "chromedriver (package chromium-driver); `make data` installs both")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]' (it is in the test extras)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1000,1400", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read at the end
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    """The memory, its encoder and the query PNG; items' uris cycle through the four source kinds."""
    from pipelines.encoders import load_encoder
    from pipelines.images import decode_image
    from pipelines.sources import FASHION_MNIST_DIR, fashion_mnist

    tmp = tmp_path_factory.mktemp("page")
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    rows = np.concatenate([np.flatnonzero(train_y == c)[:PER_CLASS] for c in KEEP])
    labels = np.array([CLASSES.index(KEEP[c]) for c in train_y[rows]])
    pngs = [_png(train_x[r]) for r in rows]
    tar_path, parquet_path = str(tmp / "shard.tar"), str(tmp / "images.parquet")
    train_images = os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
    item_uris, parquet_images = [], []
    with tarfile.open(tar_path, "w") as tar:
        for i, (r, data) in enumerate(zip(rows, pngs)):
            kind = i % 4
            if kind == 0:
                item_uris.append(uris.idx_uri(train_images, r))
            elif kind == 1:
                (tmp / f"{r}.png").write_bytes(data)
                item_uris.append(str(tmp / f"{r}.png"))
            elif kind == 2:
                info = tarfile.TarInfo(f"train/{r}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                item_uris.append(uris.tar_uri(tar_path, f"train/{r}"))
            else:
                item_uris.append(uris.parquet_uri(parquet_path, len(parquet_images)))
                parquet_images.append(data)
    pq.write_table(pa.table({"image": parquet_images}), parquet_path)

    enc = load_encoder("efficientnet-lite0", SIZE)
    emb = enc.embed(np.stack([decode_image(p, SIZE) for p in pngs]))
    query_row = int(np.flatnonzero(test_y == 7)[0])  # a sneaker the memory has not seen
    query_png = _png(test_x[query_row])
    (tmp / "query.png").write_bytes(query_png)
    q = enc.embed(decode_image(query_png, SIZE)[None])
    near = q[0] + 0.2 * np.random.default_rng(3).standard_normal(q.shape[1]).astype(np.float32) / np.sqrt(q.shape[1])
    ids = [f"fmnist/train/{r}" for r in rows] + [TWIN, NO_IMAGE]
    root = str(tmp / "mem")
    write_memory(root, np.concatenate([emb, q, near[None] / np.linalg.norm(near)]),
                 np.concatenate([labels, [CLASSES.index("bag"), CLASSES.index("sneaker")]]), ids, num_shards=2,
                 class_names=CLASSES, encoder=enc.spec.to_manifest(),
                 provenance={"uri": np.array(item_uris + [str(tmp / "query.png"), ""], dtype=object)})
    kinds = {i: uris.parse(u)[0] for i, u in zip(ids, item_uris + [str(tmp / "query.png")])}
    return {"root": root, "query": q, "query_png": query_png, "query_path": str(tmp / "query.png"), "ids": ids,
            "kinds": kinds}


def _small_png(src: str, dst: str) -> None:
    """``src`` cropped to what the page drew and reduced to 64 colours: a picture small enough to commit."""
    img = Image.open(src).convert("RGB")
    ink = np.flatnonzero((np.asarray(img.convert("L")) < 250).any(axis=1))
    img = img.crop((0, 0, img.width, min(img.height, int(ink[-1]) + 16)))
    img.quantize(colors=64).save(dst, optimize=True)


class Page:
    """The page in a browser: what it shows, read from the DOM."""

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.By = driver, By
        self.wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
        driver.get(url + "/")
        self.wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"
                        or d.find_element(By.ID, "error").is_displayed())
        assert not self.el("error").is_displayed(), self.el("error").text

    def el(self, id_):
        return self.d.find_element(self.By.ID, id_)

    def seq(self) -> int:
        return int(self.el("result").get_attribute("data-seq"))

    def result_after(self, seq: int, **want) -> dict:
        """The first result newer than ``seq`` (and showing ``want``'s settings) once it is on the page."""
        def shown(d):
            r = self.el("result")
            if self.el("error").is_displayed():
                return "error"
            if r.get_attribute("data-state") != "done" or self.seq() <= seq:
                return False
            return all(r.get_attribute(f"data-{k}") == str(v) for k, v in want.items())

        assert self.wait.until(shown) is True, self.el("error").text
        r = self.el("result")
        rows = self.d.find_elements(self.By.CSS_SELECTOR, "#neighbours tbody tr")
        return {"label": r.get_attribute("data-label") or None, "label_index": int(r.get_attribute("data-label-index")),
                "confidence": float(r.get_attribute("data-confidence")), "version": int(r.get_attribute("data-version")),
                "decision": self.el("decision").text, "ids": [row.get_attribute("data-id") for row in rows],
                "labels": [row.find_element(self.By.CSS_SELECTOR, "td.label").text for row in rows]}

    def vote(self, method=None, k=None, ties=None, abstain_below=None) -> None:
        """Change settings as a person does; each change classifies again."""
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import Select

        for id_, value in (("method", method), ("ties", ties)):
            if value is not None:
                Select(self.el(id_)).select_by_value(value)
        for id_, value in (("k", k), ("abstain-below", abstain_below)):
            if value is not None:
                box = self.el(id_)
                box.send_keys(Keys.CONTROL, "a")
                box.send_keys(Keys.DELETE if value == "" else str(value))
                box.send_keys(Keys.TAB)  # leaving the field fires its change

    def images_shown(self) -> dict:
        """``{item id: "image" | "no image" | "loading"}`` of the neighbours table's thumbnails."""
        out = {}
        for row in self.d.find_elements(self.By.CSS_SELECTOR, "#neighbours tbody tr"):
            cell = row.find_elements(self.By.CSS_SELECTOR, "td")[1]
            img = cell.find_elements(self.By.TAG_NAME, "img")
            if img:
                ok = self.d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img[0])
                out[row.get_attribute("data-id")] = "image" if ok else "loading"
            else:
                out[row.get_attribute("data-id")] = cell.text
        return out


def _same(page: dict, api: dict, lib, i: int = 0) -> None:
    """The page shows what the API answered and the library computes."""
    r = api["results"][0]
    assert page["label"] == r.get("label") == lib.predicted_names[i]
    assert page["label_index"] == r["label_index"] == int(lib.predictions[i])
    assert page["confidence"] == pytest.approx(r["confidence"], abs=1e-9)
    assert r["confidence"] == pytest.approx(float(lib.confidence[i]), abs=1e-6)
    assert page["ids"] == [n["id"] for n in r["neighbours"]] == [x for x in lib.neighbours.ids[i] if x]
    assert page["labels"] == [n["label_name"] for n in r["neighbours"]]


def test_page_classifies_explains_revotes_and_removes_a_neighbour(memory, tmp_path):
    root = memory["root"]
    app = create_app(root, encoder="efficientnet-lite0", admin_token=TOKEN, poll_s=0)
    driver = _browser(tmp_path)
    try:
        with Running(app) as srv, VismemClient(srv.url) as api:
            def check(page_result, lib_version=None, **settings):
                res = api.classify(images=[memory["query_png"]], **settings)
                with Memory.open(root, lib_version) as mem:
                    lib = mem.classify(memory["query"], **settings)
                _same(page_result, res, lib)
                return res

            page = Page(driver, srv.url)
            assert driver.title.startswith("vismem")
            assert f"{len(memory['ids'])} items" in page.el("memory-info").text

            # Upload: the server's encoder embeds it; the defaults are rank voting, k = 10, ties nearest.
            page.el("image-file").send_keys(memory["query_path"])
            shown = page.result_after(0, method="rank", k=10, ties="nearest")
            check(shown, k=10, method="rank", ties="nearest")
            assert shown["ids"][0] == TWIN and NO_IMAGE in shown["ids"] and len(shown["ids"]) == 10
            assert "query.png" in page.el("query-caption").text
            page.wait.until(lambda d: "loading" not in page.images_shown().values())
            images = page.images_shown()
            # Every thumbnail loads, through GET /v1/items/{id}/image; the item without one says so in its place.
            assert images.pop(NO_IMAGE) == "no image" and set(images.values()) == {"image"}, images
            scores = driver.find_elements(page.By.CSS_SELECTOR, "#scores tbody tr")
            assert sorted(r.find_elements(page.By.TAG_NAME, "td")[0].text for r in scores) == sorted(CLASSES)

            # Another rule, k and tie rule; then an abstention (confidence below 1 with two classes voting).
            for settings in ({"method": "plurality", "k": 5, "ties": "leader"},
                             {"method": "softmax", "k": 15, "ties": "nearest"}):
                seq = page.seq()
                page.vote(**settings)
                check(page.result_after(seq, **settings), **settings)
            page.wait.until(lambda d: "loading" not in page.images_shown().values())
            images = page.images_shown()
            assert images.pop(NO_IMAGE) == "no image" and set(images.values()) == {"image"}, images
            assert {memory["kinds"][i] for i in images} == set(uris.KINDS)  # IDX, file, tar and Parquet images
            seq = page.seq()
            page.vote(abstain_below=1)
            shown = page.result_after(seq, label="")
            res = check(shown, method="softmax", k=15, ties="nearest", abstain_below=1.0)
            assert res["results"][0]["abstained"] and shown["label"] is None and "abstained" in shown["decision"]

            # A wrong admin token: the server's 401 is the page's one-line error, and nothing is removed.
            assert not driver.find_elements(page.By.CSS_SELECTOR, "button.remove")  # no token, no button
            page.el("admin-token").send_keys("not-the-token-0123456789")
            driver.find_element(page.By.CSS_SELECTOR, f'#neighbours tr[data-id="{TWIN}"] button.remove').click()
            page.wait.until(lambda d: page.el("error").is_displayed())
            assert page.el("error").text == "HTTP 401: invalid admin token" and api.info()["version"] == 1

            # With the admin token each neighbour has a Remove button; the README's picture is taken here.
            page.el("admin-token").clear()
            page.el("admin-token").send_keys(TOKEN)
            seq = page.seq()
            page.vote(abstain_below="", method="rank", k=8)
            shown = page.result_after(seq, method="rank", k=8)
            check(shown, method="rank", k=8)
            assert len(driver.find_elements(page.By.CSS_SELECTOR, "#neighbours button.remove")) == 8
            page.wait.until(lambda d: "loading" not in page.images_shown().values())
            driver.execute_script("document.activeElement.blur()")
            shot = str(tmp_path / "serve-page.png")
            assert driver.save_screenshot(shot)
            if os.environ.get("VISMEM_PAGE_SCREENSHOT"):  # make docs/serve-page.png again with this
                _small_png(shot, os.environ["VISMEM_PAGE_SCREENSHOT"])

            # At k = 1 the mislabelled twin decides; removing it (a new version) changes the decision.
            seq = page.seq()
            page.vote(method="distance", k=1)
            shown = page.result_after(seq, method="distance", k=1, label="bag")
            check(shown, method="distance", k=1)
            assert shown["ids"] == [TWIN] and shown["decision"] == "bag"
            button = driver.find_element(page.By.CSS_SELECTOR, f'#neighbours tr[data-id="{TWIN}"] button.remove')
            seq = page.seq()
            button.click()
            after = page.result_after(seq, version=2)
            check(after, lib_version=2, method="distance", k=1)
            assert TWIN not in after["ids"] and after["label"] == "sneaker" != shown["label"]
            page.wait.until(lambda d: "Removed upload-twin" in page.el("status").text)
            assert "version 2" in page.el("status").text
            page.wait.until(lambda d: f"version 2: {len(memory['ids']) - 1} items" in page.el("memory-info").text)
            assert httpx.get(f"{srv.url}/v1/items/{TWIN}/image").status_code == 404  # its image is gone too

            seq = page.seq()
            page.vote(method="rank", k=8)
            shown = page.result_after(seq, method="rank", k=8, version=2)
            check(shown, lib_version=2, method="rank", k=8)
            assert TWIN not in shown["ids"]

            # A stored item by id (ids with slashes): it is its own nearest neighbour.
            item = memory["ids"][PER_CLASS + 3]  # a sneaker
            page.el("kind-item").click()
            page.el("item-id").send_keys(item)
            seq = page.seq()
            page.el("classify").click()
            shown = page.result_after(seq)
            stored = httpx.get(f"{srv.url}/v1/items/{item}").json()["embedding"]
            res = api.classify(np.array([stored]), k=8, method="rank")
            with Memory.open(root) as mem:
                lib = mem.classify(np.array([stored], dtype=np.float32), k=8, method="rank")
            _same(shown, res, lib)
            assert shown["ids"][0] == item and shown["label"] == "sneaker"

            # An error is one line on the page, naming the problem.
            page.el("item-id").clear()
            page.el("item-id").send_keys("no/such/item")
            page.el("classify").click()
            page.wait.until(lambda d: page.el("error").is_displayed())
            error = page.el("error")
            assert "HTTP 404" in error.text and "no live item 'no/such/item'" in error.text
            assert "\n" not in error.text and error.size["height"] < 40
            # The console: no script error and nothing blocked by the page's Content-Security-Policy; the
            # only failed loads are the 404s of items without an image (and of the id asked for above) and the
            # 401 of the wrong token.
            for entry in driver.get_log("browser"):
                text = entry["message"]
                assert "Uncaught" not in text and "Content Security Policy" not in text, text
                if entry["level"] == "SEVERE":
                    assert ("404" in text and "/v1/items/" in text) or ("401" in text and "/v1/admin/remove" in text), text
    finally:
        driver.quit()

    with open(shot, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert pixels.shape[1] >= 900 and pixels.std() > 20  # text, tables and thumbnails, not a blank page
