"""The embedding pipeline's pure parts, without Ray: decoding and quarantine, sources, label maps, probes."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memory import uris
from memory.idx import write_idx
from pipelines import images, sources, teachers
from pipelines.embed_summary import summarise
from pipelines.embed_worker import ShardProcessor, decode_shard
from pipelines.sources import SourceSpec, open_source


def _png(arr, mode=None, **save):
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG", **save)
    return buf.getvalue()


def _jpeg(arr, mode="RGB"):
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is a text file, not a picture\n" * 3, "not an image"),
    (OSError("permission denied"), "unreadable: permission denied"),
])
def test_bad_inputs_are_refused_with_their_reason(data, reason):
    with pytest.raises(images.BadImage, match=reason):
        images.decode_image(data, 16)


def test_truncated_png_and_jpeg_are_refused():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for data in (_png(arr), _jpeg(arr)):
        with pytest.raises(images.BadImage, match="truncated or corrupt"):
            images.decode_image(data[: len(data) // 2], 16)


def test_huge_png_refused_from_its_header_huge_jpeg_decoded_at_reduced_scale():
    big = np.zeros((2000, 2000), np.uint8)
    with pytest.raises(images.BadImage, match=r"too large: 2000x2000 = 4000000 pixels \(limit 1000000\)"):
        images.decode_image(_png(big), 32, max_pixels=1_000_000)
    # JPEG draft decodes at 1/8 scale (250x250 = 62,500 pixels), under the limit: converted, not refused.
    out = images.decode_image(_jpeg(np.full((2000, 2000, 3), 200, np.uint8)), 32, max_pixels=1_000_000)
    assert out.shape == (32, 32, 3) and abs(int(out.mean()) - 200) <= 2


def test_odd_modes_are_converted_to_8_bit_rgb():
    # 16-bit greyscale keeps its top byte: 0x8000 -> 128, 0xFFFF -> 255.
    arr16 = np.array([[0x8000, 0xFFFF], [0, 0x0100]], np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr16).save(buf, format="PNG")
    out = images.decode_image(buf.getvalue(), 2)
    np.testing.assert_array_equal(out[..., 0], [[128, 255], [0, 1]])
    # RGBA: a fully transparent pixel becomes white, an opaque one keeps its colour.
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0]]], np.uint8)
    direct = images.to_rgb(Image.fromarray(rgba, "RGBA"))
    assert np.asarray(direct)[0, 0].tolist() == [255, 0, 0] and np.asarray(direct)[0, 1].tolist() == [255, 255, 255]
    # CMYK JPEG, palette with transparency, 1-bit, LA and float images all come out as (S, S, 3) uint8.
    cmyk = _jpeg(np.full((8, 8, 3), 100, np.uint8), "CMYK")
    pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    pal.info["transparency"] = 0
    pbuf = io.BytesIO()
    pal.save(pbuf, format="PNG", transparency=0)
    onebit = io.BytesIO()
    Image.fromarray(np.eye(8, dtype=bool)).save(onebit, format="PNG")
    la = _png(np.stack([np.full((8, 8), 50, np.uint8), np.full((8, 8), 255, np.uint8)], -1), "LA")
    tiff = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tiff, format="TIFF")
    for data in (cmyk, pbuf.getvalue(), onebit.getvalue(), la, tiff.getvalue()):
        out = images.decode_image(data, 8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert abs(int(images.decode_image(cmyk, 8).mean()) - 100) <= 3
    assert int(images.decode_image(tiff.getvalue(), 8).mean()) == 127  # 0.5 of full scale
    assert int(images.decode_image(la, 8).mean()) == 50  # opaque grey stays grey


# -------------------------------------------------------------------------------------------- sources

def _write_folder(root, rng):
    """Two classes of real-looking images plus every kind of bad file; returns expected good ids."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    good = []
    for i in range(3):
        (root / "cat" / f"c{i}.png").write_bytes(_png(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)))
        (root / "dog" / f"d{i}.jpg").write_bytes(_jpeg(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)))
        good += [f"cat/c{i}.png", f"dog/d{i}.jpg"]
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    trunc = _png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (root / "cat" / "truncated.png").write_bytes(trunc[: len(trunc) // 2])
    (root / "cat" / ".hidden.png").write_bytes(b"ignored")
    return good


def test_folder_source_labels_by_subfolder_and_quarantines_bad_files(tmp_path):
    good = _write_folder(tmp_path / "pets", np.random.default_rng(1))
    src = open_source(SourceSpec(str(tmp_path / "pets"), shard_size=4))
    assert src.spec.kind == "folder" and src.spec.name == "pets" and src.class_names == ["cat", "dog"]
    shards = src.shards()
    assert [s.name for s in shards] == ["shard-00000-of-00003", "shard-00001-of-00003", "shard-00002-of-00003"]
    assert sum(s.size for s in shards) == 9  # the hidden file is not listed
    decoded = [decode_shard(src, s, 16) for s in shards]
    ids = np.concatenate([d["ids"] for d in decoded])
    assert sorted(ids) == sorted(f"pets/{g}" for g in good)
    labels = dict(zip(ids, np.concatenate([d["labels"] for d in decoded])))
    assert labels["pets/cat/c0.png"] == 0 and labels["pets/dog/d2.jpg"] == 1
    errors = {e[0]: e[2] for d in decoded for e in d["errors"]}
    assert errors == {"pets/dog/empty.jpg": "empty file", "pets/dog/notes.txt": "not an image: no known image format",
                      "pets/cat/truncated.png": errors["pets/cat/truncated.png"]}
    assert errors["pets/cat/truncated.png"].startswith("truncated or corrupt image")
    assert all(d["images"].shape[1:] == (16, 16, 3) for d in decoded)
    uri = next(u for d in decoded for u in d["uris"] if u.endswith("c0.png"))
    assert uri == f"{tmp_path}/pets/cat/c0.png" and uris.resolve(uri) == (tmp_path / "pets/cat/c0.png").read_bytes()


def test_idx_source_shards_ids_labels_and_hidden_fraction(tmp_path):
    x, y = sources.fashion_mnist("test")
    write_idx(str(tmp_path / "fm" / "t10k-images-idx3-ubyte.gz"), x[:50])
    write_idx(str(tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz"), y[:50].astype(np.uint8))
    spec = SourceSpec(str(tmp_path / "fm"), split="test", shard_size=20, unlabelled_fraction=0.5)
    src = open_source(spec)
    assert src.spec.kind == "idx" and [s.size for s in src.shards()] == [20, 20, 10]
    recs = [r for s in src.shards() for r in src.read(s)]
    assert [r.id for r in recs] == [f"fm/test/{i:05d}" for i in range(50)]
    np.testing.assert_array_equal(recs[7].payload, x[7])
    assert recs[7].uri == f"{tmp_path}/fm/t10k-images-idx3-ubyte.gz#7"
    np.testing.assert_array_equal(uris.resolve(recs[7].uri), x[7])
    hidden = [r for r in recs if r.label < 0]
    # Roughly half hidden, each one's true label kept aside, and the choice is a function of the id alone.
    assert 10 <= len(hidden) <= 40
    assert all(r.true_label == y[int(r.id[-5:])] for r in hidden)
    assert all(r.label == y[int(r.id[-5:])] and r.true_label == -1 for r in recs if r.label >= 0)
    again = [r.id for s in open_source(spec).shards() for r in open_source(spec).read(s) if r.label < 0]
    assert again == [r.id for r in hidden]
    assert [s.size for s in open_source(SourceSpec(str(tmp_path / "fm"), split="test", limit=25,
                                                   shard_size=20)).shards()] == [20, 5]


def test_webdataset_and_parquet_sources(tmp_path):
    rng = np.random.default_rng(2)
    tar_path = tmp_path / "wds" / "part-000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(3):
            add(f"s{i}.png", _png(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)))
            add(f"s{i}.cls", str(i + 4).encode())
        add("s3.json", json.dumps({"label": 2}).encode())  # a sample with no image member
    src = open_source(SourceSpec(str(tmp_path / "wds")))
    assert src.spec.kind == "webdataset"
    (shard,) = src.shards()
    d = decode_shard(src, shard, 8)
    assert d["ids"].tolist() == ["wds/part-000.tar/s0", "wds/part-000.tar/s1", "wds/part-000.tar/s2"]
    assert d["labels"].tolist() == [4, 5, 6]
    assert d["uris"][1] == f"{tar_path}#s1" and uris.resolve(d["uris"][1]).startswith(b"\x89PNG")
    assert d["errors"] == [("wds/part-000.tar/s3", f"{tar_path}#s3", "unreadable: no image member in sample "
                            "(members: json)")]

    pngs = [_png(rng.integers(0, 256, (10, 10), dtype=np.uint8)) for _ in range(5)]
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in pngs[:4]] + [{"bytes": b"junk",
                                                                                           "path": None}]),
                      "label": pa.array([0, 1, None, 1, 0], pa.int64()),
                      "id": [f"row{i}" for i in range(5)]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "a.parquet")
    src = open_source(SourceSpec(str(tmp_path / "pq"), shard_size=2, limit=5))
    assert src.spec.kind == "parquet" and [s.size for s in src.shards()] == [2, 2, 1]
    ds = [decode_shard(src, s, 8) for s in src.shards()]
    assert np.concatenate([d["ids"] for d in ds]).tolist() == ["pq/row0", "pq/row1", "pq/row2", "pq/row3"]
    assert np.concatenate([d["labels"] for d in ds]).tolist() == [0, 1, -1, 1]
    assert ds[0]["uris"][1] == f"{tmp_path}/pq/a.parquet#1" and uris.resolve(ds[0]["uris"][1]) == pngs[1]
    assert ds[2]["errors"][0][0] == "pq/row4" and ds[2]["errors"][0][2].startswith("not an image")
    with pytest.raises(ValueError, match="no image column 'pixels'"):
        open_source(SourceSpec(str(tmp_path / "pq"), image_column="pixels")).shards()


def test_missing_source_and_bad_options_fail_at_the_door(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"source not found: {tmp_path}/nope"):
        open_source(SourceSpec(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="unlabelled fraction must be in"):
        open_source(SourceSpec("fashion-mnist", unlabelled_fraction=1.5))
    with pytest.raises(ValueError, match="unknown source kind 'zip'"):
        open_source(SourceSpec("fashion-mnist", kind="zip"))
    with pytest.raises(ValueError, match="split must be one of train, test"):
        open_source(SourceSpec("fashion-mnist", split="val")).shards()


# ------------------------------------------------------------------------------- label maps and probes

def test_label_map_load_apply_and_errors(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"map": {"3": 0, "7": 1}, "names": {"3": "x"}}))
    lm = teachers.load_label_map(str(path), 10)
    np.testing.assert_array_equal(lm.apply(np.array([3, 7, 5, 0, 42, -1])), [0, 1, -1, -1, -1, -1])
    for doc, msg in [({"12": 0}, "teacher class 12 is out of range"), ({"a": 1}, "is not integer -> integer"),
                     ({"3": -2}, "negative class"), ([], "must be a JSON object")]:
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=msg):
            teachers.load_label_map(str(path), 10)
    with pytest.raises(FileNotFoundError, match="label map not found"):
        teachers.load_label_map(str(tmp_path / "missing.json"))
    shipped = teachers.load_label_map(f"{teachers.LABEL_MAP_DIR}/imagenet_to_fashion_mnist.json", 1000)
    assert shipped.mapping[610] == 0 and shipped.mapping[774] == 5 and len(shipped.mapping) == 18


def test_probe_fits_separable_clusters_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((3, 16))
    y = np.repeat(np.arange(3), 30)
    x = centres[y] + 0.05 * rng.standard_normal((90, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y_partial = y.copy()
    y_partial[::3] = -1  # unlabelled rows are not fit
    probe = teachers.fit_probe(x, y_partial, encoder="efficientnet-lite0", image_size=32, class_names=["a", "b", "c"])
    assert (probe.logits(x).argmax(1) == y).all()
    teachers.save_probe(str(tmp_path / "p.npz"), probe)
    back = teachers.load_probe(str(tmp_path / "p.npz"))
    np.testing.assert_array_equal(back.weight, probe.weight)
    assert (back.encoder, back.image_size, back.class_names) == ("efficientnet-lite0", 32, ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least two classes"):
        teachers.fit_probe(x, np.zeros(90, int), encoder="e", image_size=1)
    with pytest.raises(FileNotFoundError, match="probe not found"):
        teachers.load_probe(str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="unknown teacher 'resnet'"):
        teachers.load_teacher("resnet")


def test_shard_processor_pseudo_labels_excludes_and_counts():
    """A teacher with a hand-made answer: class = first pixel // 100, confidence = first pixel / 255."""
    import torch

    class Enc:
        name, version, dim, image_size, device = "toy", "1", 2, 2, "cpu"

        def embed_with_features(self, imgs):
            f = torch.tensor(imgs.reshape(len(imgs), -1)[:, :2], dtype=torch.float32) + 1
            return torch.nn.functional.normalize(f, dim=1).numpy(), f

    class Toy(teachers.Teacher):
        name, num_classes = "toy", 3

        def classify(self, imgs, feats):
            p = imgs.reshape(len(imgs), -1)[:, 0].astype(int)
            return p // 100, (p / 255).astype(np.float32)

    px = np.array([10, 120, 250, 130, 220, 5], np.uint8)
    imgs = np.repeat(px[:, None, None], 2, 1).repeat(2, 2)
    decoded = {"ids": np.array([f"r{i}" for i in range(6)], object), "uris": np.array([""] * 6, object),
               "labels": np.array([1, -1, -1, -1, -1, -1], np.int32),
               "true_labels": np.array([-1, 0, 1, 0, 2, -1], np.int32),
               "images": imgs, "errors": [("bad", "u", "empty file")], "read": 7}
    lm = teachers.LabelMap({0: 2, 1: 0})  # teacher class 2 has no correspondence
    proc = ShardProcessor(Enc(), Toy(), lm, min_confidence=0.5, batch_size=4, source_name="toy")
    table, errors, stats = proc.process("shard-00000-of-00001", decoded, {"encoder": "toy"})
    # r0 human; r1 class 1 -> 0 (0.47 < 0.5: below confidence); r2 class 2: no correspondence;
    # r3 class 1 -> 0 conf 0.51 kept (truth 0: correct); r4 class 2 excluded; r5 class 0 -> 2 conf 0.02: below.
    assert table.column("id").to_pylist() == ["r0", "r3"]
    assert table.column("label").to_pylist() == [1, 0]
    assert table.column("label_source").to_pylist() == ["human", "teacher"]
    assert stats["pseudo_labelled"] == 1 and stats["excluded_no_correspondence"] == 2
    assert stats["below_confidence"] == 2 and stats["quarantined"] == 1 and stats["read"] == 7
    assert stats["pseudo_evaluated"] == 1 and stats["pseudo_correct"] == 1 and stats["embedded"] == 2
    assert errors == [("bad", "u", "empty file", "shard-00000-of-00001", "toy")]
    assert summarise([stats, stats])["pseudo_label_accuracy"] == 1.0
    assert table.schema.metadata[b"input_shard"] == b"shard-00000-of-00001"
