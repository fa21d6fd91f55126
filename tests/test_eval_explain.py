"""The interpretability page on real Fashion-MNIST images, rendered in headless Chromium."""
import os
import subprocess

import numpy as np

from eval.explain import explain_page, resolve_image
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
    assert resolve_image(f"{images}#0")[:4] == b"\x89PNG"

    dom = _chromium("--dump-dom", "--virtual-time-budget=10000", "file://" + out)
    assert f'data-rendered="{res["images"]}/{res["images"]}"' in dom.stdout, dom.stderr[-2000:]
    shot = str(tmp_path / "why.png")
    _chromium(f"--screenshot={shot}", "--window-size=1000,900", "--virtual-time-budget=10000", "file://" + out)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 20  # images and text, not a blank page
