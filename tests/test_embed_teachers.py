"""Pseudo-labelling on real Ray with real teachers: the EfficientNet ImageNet head with a label map, and a
linear probe fit on human labels, scored against Fashion-MNIST labels hidden from the pipeline."""
import numpy as np
import pytest
import ray
import torch

from memory.encoder_spec import EncoderSpec
from pipelines.embed import EmbedConfig, run_embed
from pipelines.encoders import load_encoder
from pipelines.outputs import read_run
from pipelines.probe import fit_probe_from_shards
from pipelines.sources import SourceSpec, fashion_mnist
from pipelines.sources.base import hidden
from pipelines.teachers import LABEL_MAP_DIR, load_label_map, load_probe

FM_MAP = f"{LABEL_MAP_DIR}/imagenet_to_fashion_mnist.json"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def test_imagenet_head_teacher_with_label_map_excludes_unmapped_and_counts(tmp_path):
    n, size = 120, 64
    spec = SourceSpec("fashion-mnist", split="test", limit=n, shard_size=60, unlabelled_fraction=1.0)
    s = run_embed(EmbedConfig(spec, str(tmp_path / "t"), image_size=size, batch_size=30, teacher="efficientnet-lite0",
                              label_map=FM_MAP, min_confidence=0.2, progress=False))
    # Oracle: the same network's ImageNet head, called directly, and the same label map.
    x, y = fashion_mnist("test")
    enc = load_encoder("efficientnet-lite0", size)
    _, feats = enc.embed_with_features(x[:n])
    probs = torch.softmax(enc.head(feats), 1).numpy()
    cls, conf = probs.argmax(1), probs.max(1)
    mapped = load_label_map(FM_MAP, 1000).apply(cls)
    no_match = mapped < 0
    low = ~no_match & (conf < 0.2)
    kept = ~no_match & ~low
    c = s["counts"]
    assert c["read"] == n and c["human_labelled"] == 0 and c["hidden_labels"] == n
    # Off-by-one slack only for an image whose top probability sits on the threshold within float noise.
    assert abs(c["excluded_no_correspondence"] - no_match.sum()) <= 1
    assert abs(c["below_confidence"] - low.sum()) <= 1
    assert c["pseudo_labelled"] == c["embedded"] == n - c["excluded_no_correspondence"] - c["below_confidence"]
    assert 0 < c["pseudo_labelled"] < n, "the label map should keep some images and exclude others"
    run = read_run(str(tmp_path / "t"))
    rows = np.array([int(i[-5:]) for i in run["ids"]])
    assert abs(len(rows) - kept.sum()) <= 1 and np.isin(rows, np.flatnonzero(~no_match)).all()
    np.testing.assert_array_equal(run["labels"], mapped[rows])
    assert set(run["provenance"]["label_source"]) == {"teacher"}
    np.testing.assert_allclose(run["provenance"]["confidence"], conf[rows], atol=1e-4)
    assert (run["provenance"]["confidence"] >= 0.2).all()
    assert s["pseudo_label_accuracy"] == pytest.approx((mapped[rows] == y[rows]).mean())
    assert s["teacher"]["name"] == "efficientnet-lite0/imagenet-head" and s["teacher"]["label_map_entries"] == 18
    # The shards and the summary describe the encoder by its spec, preprocessing included.
    assert enc.spec == EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", size, "rgb (x - 127) / 128")
    assert EncoderSpec.from_metadata(run["metadata"]) == enc.spec
    assert s["encoder"] == {**enc.spec.to_manifest(), "dim": 1280, "dtype": "float32"}


def test_probe_teacher_pseudo_label_accuracy_on_hidden_labels(tmp_path):
    size = 32
    train = SourceSpec("fashion-mnist", split="train", limit=400, shard_size=200)
    run_embed(EmbedConfig(train, str(tmp_path / "train"), image_size=size, batch_size=50, progress=False))
    fit = fit_probe_from_shards(str(tmp_path / "train"), str(tmp_path / "probe.npz"))
    assert fit["rows"] == 400 and fit["classes"] == 10 and fit["encoder"] == "efficientnet-lite0"
    assert fit["image_size"] == size and fit["train_accuracy"] > 0.8
    probe = load_probe(str(tmp_path / "probe.npz"))
    assert probe.class_names[9] == "Ankle boot"

    # Half of 150 test labels hidden (chosen by id); the probe labels those, the rest stay human.
    test = SourceSpec("fashion-mnist", split="test", limit=150, shard_size=75, unlabelled_fraction=0.5)
    s = run_embed(EmbedConfig(test, str(tmp_path / "test"), image_size=size, batch_size=50,
                              teacher=f"probe:{tmp_path / 'probe.npz'}", progress=False))
    x, y = fashion_mnist("test")
    is_hidden = np.array([hidden(f"fashion-mnist/test/{i:05d}", 0.5) for i in range(150)])
    emb = load_encoder("efficientnet-lite0", size).embed(x[:150])
    pred = probe.logits(emb).argmax(1)
    oracle_acc = (pred[is_hidden] == y[:150][is_hidden]).mean()
    c = s["counts"]
    assert c["hidden_labels"] == c["pseudo_labelled"] == is_hidden.sum() and c["human_labelled"] == (~is_hidden).sum()
    assert c["excluded_no_correspondence"] == 0 and c["embedded"] == 150
    assert s["pseudo_label_accuracy"] == pytest.approx(oracle_acc, abs=1 / is_hidden.sum())
    # 400 training images at 32 px: ~0.7 here; chance is 0.1.
    assert s["pseudo_label_accuracy"] > 0.55
    run = read_run(str(tmp_path / "test"))
    src = run["provenance"]["label_source"]
    rows = np.array([int(i[-5:]) for i in run["ids"]])
    np.testing.assert_array_equal(src == "teacher", is_hidden[rows])
    np.testing.assert_array_equal(run["labels"][src == "human"], y[rows][src == "human"])
