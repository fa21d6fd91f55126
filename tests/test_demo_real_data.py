"""Real data, real weights: Fashion-MNIST embedded by EfficientNet-Lite0 and classified by the memory."""
import numpy as np

from memory import Memory, write_memory
from pipelines.encoders import load_encoder
from pipelines.sources import FASHION_MNIST_CLASSES, fashion_mnist, read_idx


def test_fashion_mnist_knn_with_pretrained_encoder(tmp_path):
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    enc = load_encoder("efficientnet-lite0", image_size=32)
    mem_x, mem_y = train_x[:1500], train_y[:1500]
    emb = np.concatenate([enc.embed(mem_x[i:i + 250]) for i in range(0, 1500, 250)])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    write_memory(str(tmp_path / "m"), emb, mem_y, [f"train/{i}" for i in range(1500)], num_shards=3,
                 class_names=FASHION_MNIST_CLASSES)
    q = enc.embed(test_x[:300])
    with Memory.open(str(tmp_path / "m")) as mem:
        acc = {m: float((mem.classify(q, 10, m).predictions == test_y[:300]).mean())
               for m in ("plurality", "rank")}
    # Pretrained ImageNet features at 32 px on 1,500 memory items: ~0.70 here; chance is 0.10.
    assert acc["rank"] > 0.6 and acc["plurality"] > 0.6, acc


def test_truncated_idx_is_refused(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 10, 1, 2, 3]))
    try:
        read_idx(str(path))
    except ValueError as exc:
        assert "truncated" in str(exc)
    else:
        raise AssertionError("a truncated IDX file was accepted")
