"""``vismem embed`` on a real local Ray instance, real EfficientNet-Lite0 weights, real Fashion-MNIST."""
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from memory import schema
from pipelines.embed import EmbedConfig, run_embed
from pipelines.encoders import load_encoder
from pipelines.outputs import OutputLayout, read_errors, read_run
from pipelines.sources import SourceSpec, fashion_mnist


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(spec, out, **kw):
    kw = {"image_size": 32, "batch_size": 25, "progress": False, **kw}
    return EmbedConfig(spec, str(out), **kw)


def test_fashion_mnist_rows_match_the_plain_encoder_and_a_rerun_resumes(tmp_path):
    spec = SourceSpec("fashion-mnist", split="test", limit=150, shard_size=50)
    s = run_embed(_cfg(spec, tmp_path / "a"))
    assert s["shards"] == {"total": 3, "written_this_run": 3, "complete_before": 0}
    c = s["counts"]
    assert c["read"] == c["embedded"] == c["human_labelled"] == 150 and c["quarantined"] == 0
    assert s["encoder"] == {"name": "efficientnet-lite0", "version": "imagenet-0.1.0", "image_size": 32,
                            "preprocessing": "rgb (x - 127) / 128", "dim": 1280, "dtype": "float32"}
    assert s["ray"]["workers"] == 1 and s["throughput"]["images_this_run"] == 150
    assert s["source"]["class_names"][0] == "T-shirt/top"
    run = read_run(str(tmp_path / "a"))
    x, y = fashion_mnist("test")
    assert run["ids"].tolist() == [f"fashion-mnist/test/{i:05d}" for i in range(150)]
    np.testing.assert_array_equal(run["labels"], y[:150])
    assert set(run["provenance"]["label_source"]) == {"human"} and run["metadata"]["encoder"] == "efficientnet-lite0"
    # Oracle: the same encoder called directly in this process, one batch.
    np.testing.assert_allclose(run["embeddings"], load_encoder("efficientnet-lite0", 32).embed(x[:150]), atol=1e-4)

    # Same command again: nothing to do, same counts; a lost shard is redone and only that one.
    again = run_embed(_cfg(spec, tmp_path / "a"))
    assert again["shards"] == {"total": 3, "written_this_run": 0, "complete_before": 3}
    assert again["counts"] == s["counts"]
    os.remove(OutputLayout(str(tmp_path / "a")).shard_path("shard-00001-of-00003"))
    third = run_embed(_cfg(spec, tmp_path / "a"))
    assert third["shards"] == {"total": 3, "written_this_run": 1, "complete_before": 2}
    redone = read_run(str(tmp_path / "a"))
    assert redone["ids"].tolist() == run["ids"].tolist()
    np.testing.assert_allclose(redone["embeddings"], run["embeddings"], atol=1e-6)

    # A different run into the same folder is refused, naming what differs.
    with pytest.raises(ValueError, match=r"holds a different run \(image_size: 32 there, 48 now\)"):
        run_embed(_cfg(spec, tmp_path / "a", image_size=48))


def _png(arr, mode=None):
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_with_bad_files_quarantines_them_and_goes_on(tmp_path):
    x, y = fashion_mnist("train")
    root = tmp_path / "clothes"
    names = {0: "tshirt", 1: "trouser"}
    expected = []
    for i in np.flatnonzero(np.isin(y[:200], [0, 1]))[:12]:
        d = root / names[int(y[i])]
        d.mkdir(parents=True, exist_ok=True)
        mode = ["L", "RGB", "RGBA", "CMYK"][i % 4]
        img = Image.fromarray(x[i]).convert(mode)
        img.save(d / f"{i:05d}.{'jpg' if mode == 'CMYK' else 'png'}")
        expected.append(f"clothes/{names[int(y[i])]}/{i:05d}.{'jpg' if mode == 'CMYK' else 'png'}")
    whole = _png(x[0])
    (root / "tshirt" / "broken.png").write_bytes(whole[: len(whole) // 2])
    (root / "tshirt" / "zero.png").write_bytes(b"")
    (root / "trouser" / "readme.txt").write_text("hello")
    s = run_embed(_cfg(SourceSpec(str(root), shard_size=5), tmp_path / "out", dtype="float16"))
    assert s["counts"]["read"] == 15 and s["counts"]["quarantined"] == 3 and s["counts"]["embedded"] == 12
    assert s["source"]["class_names"] == ["trouser", "tshirt"]
    run = read_run(str(tmp_path / "out"))
    assert sorted(run["ids"]) == sorted(expected)
    # float16 storage: the PNG images (lossless, greyscale kept in every mode) embed as the raw pixels do,
    # within float16's relative precision.
    shard = OutputLayout(str(tmp_path / "out")).shard_path("shard-00000-of-00003")
    assert pq.read_schema(shard).field("embedding").type.value_type == pa.float16()
    png = np.array(["png" in i for i in run["ids"]])
    rows = [int(i.rsplit("/", 1)[1][:5]) for i in run["ids"][png]]
    direct = load_encoder("efficientnet-lite0", 32).embed(
        np.stack([np.asarray(Image.fromarray(x[r]).convert("RGB").resize((32, 32), Image.BILINEAR)) for r in rows]))
    np.testing.assert_allclose(run["embeddings"][png], direct, rtol=2e-3, atol=1e-4)
    for rid, label in zip(run["ids"], run["labels"]):
        assert label == (1 if "/tshirt/" in rid else 0)
    errors = read_errors(str(tmp_path / "out")).to_pydict()
    reasons = dict(zip(errors["id"], errors["reason"]))
    assert reasons["clothes/tshirt/zero.png"] == "empty file"
    assert reasons["clothes/trouser/readme.txt"] == "not an image: no known image format"
    assert reasons["clothes/tshirt/broken.png"].startswith("truncated or corrupt image")
    assert set(errors["input_shard"]) <= {f"shard-{i:05d}-of-00003" for i in range(3)}


def test_missing_source_and_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="source not found: /nonexistent/images"):
        run_embed(_cfg(SourceSpec("/nonexistent/images"), tmp_path / "o"))
    with pytest.raises(ValueError, match="pass --label-map FILE"):
        run_embed(_cfg(SourceSpec("fashion-mnist", limit=10), tmp_path / "o", teacher="efficientnet-lite0"))
    with pytest.raises(ValueError, match="unknown encoder 'resnet50'"):
        run_embed(_cfg(SourceSpec("fashion-mnist", limit=10), tmp_path / "o", encoder="resnet50", image_size=None))
    assert not (tmp_path / "o").exists()


def test_all_zero_embeddings_are_quarantined_with_the_encoder_named(tmp_path):
    """EfficientNet-Lite2 at 32 px maps some near-blank Fashion-MNIST images to all-zero features."""
    images, _ = fashion_mnist("train")
    feats = load_encoder("efficientnet-lite2", 32).embed(images[:300])
    zero = np.flatnonzero(np.linalg.norm(feats, axis=1) == 0)
    assert len(zero) > 0  # the real encoder does this; the job must not write such rows
    spec = SourceSpec("fashion-mnist", split="train", limit=300, shard_size=100)
    s = run_embed(_cfg(spec, tmp_path / "z", encoder="efficientnet-lite2"))
    assert s["counts"]["quarantined"] == len(zero) and s["counts"]["embedded"] == 300 - len(zero)
    errors = read_errors(str(tmp_path / "z"))
    assert sorted(errors["id"].to_pylist()) == [f"fashion-mnist/train/{i:05d}" for i in zero]
    assert set(errors["reason"].to_pylist()) == {
        "encoder efficientnet-lite2 gave an all-zero or non-finite embedding (no direction to search by)"}
    written = schema.read_embedding_shards(OutputLayout(str(tmp_path / "z")).embeddings_dir)
    assert len(written["ids"]) == 300 - len(zero) and not set(written["ids"]) & set(errors["id"].to_pylist())
    np.testing.assert_allclose(np.linalg.norm(written["embeddings"], axis=1), 1, atol=1e-5)
