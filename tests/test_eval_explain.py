"""The interpretability page on real Fashion-MNIST images, rendered in headless Chromium."""
import os
import subprocess

import numpy as np

from eval.explain import explain_page
from eval.images import image_bytes
from memory import schema, write_memory
from pipelines.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist


def _chromium(*args, timeout=90):
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--user-data-dir=" + os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vismem-chrome-{os.getpid()}"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_explain_page_renders_query_and_neighbour_images(tmp_path):
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    images = os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
    timages = os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")
    # Raw pixels as embeddings: enough for a page whose neighbours are real, labelled images.
    mem_x = train_x[:600].reshape(600, -1).astype(np.float32) + 1.0
    write_memory(str(tmp_path / "m"), mem_x, train_y[:600], [f"train/{i}" for i in range(600)], num_shards=2,
                 class_names=FASHION_MNIST_CLASSES,
                 provenance={"uri": np.array([f"{images}#{i}" for i in range(600)], dtype=object)})
    qpath = str(tmp_path / "q.parquet")
    schema.write_embeddings(qpath, schema.embedding_table(
        [f"test/{i}" for i in range(40)], test_x[:40].reshape(40, -1).astype(np.float32) + 1.0, test_y[:40],
        provenance={"uri": np.array([f"{timages}#{i}" for i in range(40)], dtype=object)}))
    out = str(tmp_path / "why.html")
    res = explain_page(str(tmp_path / "m"), schema.read_embeddings(qpath), out, rows=[0, 1], k=6,
                       residual_k=3, misclassified=2)
    assert res["queries"] == 4 and res["images"] == 4 * (1 + 6 + 3)
    page = open(out).read()
    assert page.count("<img ") == res["images"] and "decision:" in page and "residual" in page
    assert image_bytes(f"{images}#0")[:4] == b"\x89PNG"

    dom = _chromium("--dump-dom", "--virtual-time-budget=10000", "file://" + out)
    assert f'data-rendered="{res["images"]}/{res["images"]}"' in dom.stdout, dom.stderr[-2000:]
    shot = str(tmp_path / "why.png")
    _chromium(f"--screenshot={shot}", "--window-size=1000,900", "--virtual-time-budget=10000", "file://" + out)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 20  # images and text, not a blank page


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_page_and_reranker_get_images_of_tar_and_parquet_items(tmp_path):
    """Items from a WebDataset tar and a Parquet file of images resolve through memory.uris (one resolver)."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import clustered
    from eval.evaluate import evaluate
    from memory import uris

    tar_path, parquet_path = str(tmp_path / "shard.tar"), str(tmp_path / "images.parquet")
    with tarfile.open(tar_path, "w") as tar:
        for i in range(30):
            data = _png(i)
            info = tarfile.TarInfo(f"s{i:03d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": [_png(100 + i) for i in range(30)]}), parquet_path, row_group_size=7)
    item_uris = [uris.tar_uri(tar_path, f"s{i:03d}") for i in range(30)] + \
        [uris.parquet_uri(parquet_path, i) for i in range(30)]
    x, labels = clustered(80, 8, 2, seed=3, noise=0.3)
    write_memory(str(tmp_path / "m"), x[:60], labels[:60], [f"m{i}" for i in range(60)], num_shards=2,
                 class_names=["a", "b"], provenance={"uri": np.array(item_uris, dtype=object)})
    qpath = str(tmp_path / "q.parquet")
    schema.write_embeddings(qpath, schema.embedding_table(  # queries are images of the same sources
        [f"q{i}" for i in range(20)], x[60:], labels[60:], provenance={"uri": np.array(item_uris[::3], dtype=object)}))

    res = explain_page(str(tmp_path / "m"), schema.read_embeddings(qpath), str(tmp_path / "why.html"),
                       rows=[0, 1, 15], k=5, residual_k=3)
    assert res["images"] == 3 * (1 + 5 + 3)
    assert image_bytes(item_uris[40]) == _png(110)

    class Recorder:
        images = []

        def rerank(self, query_image, neighbours, class_names):
            Recorder.images += [query_image, *(n.image for n in neighbours)]
            return neighbours[0].label

    evaluate(str(tmp_path / "m"), qpath, str(tmp_path / "e"), k_max=10, reranker=Recorder(), rerank_k=4,
             rerank_queries=20)
    assert len(Recorder.images) == 20 * (1 + 4)
    assert all(image is not None and image[:4] == b"\x89PNG" for image in Recorder.images)
