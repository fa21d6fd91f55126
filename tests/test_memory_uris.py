"""memory.uris: item URIs of every source kind, minted as the sources mint them and resolved from real files."""
import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memory import storage, uris
from memory.idx import write_idx


def _png(value: int, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _tar(path: str) -> None:
    """A WebDataset tar: samples a/0 (png + cls), a/1 (jpg preferred over png), 2 (json label), 3 (no
    image), and a hidden file."""
    members = {"a/0.png": _png(10), "a/0.cls": b"3", "a/1.png": _png(20), "a/1.jpg": _png(30),
               "2.png": _png(40), "2.json": b'{"label": 1}', "3.txt": b"caption", "a/.DS_Store": b"junk"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage.write_bytes_atomic(path, buf.getvalue())


def _parquet(path: str) -> None:
    """Images as plain bytes and as Hugging Face structs, over several row groups."""
    table = pa.table({"image": [_png(v) for v in range(0, 250, 50)],
                      "hf": [{"bytes": _png(v), "path": None} for v in range(5)], "label": list(range(5))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=2)
    storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())


def test_minted_strings_are_todays():
    assert uris.idx_uri("/d/train-images-idx3-ubyte.gz", 17) == "/d/train-images-idx3-ubyte.gz#17"
    assert uris.folder_uri("gs://b/imgs/", "cat/1.png") == "gs://b/imgs/cat/1.png"
    assert uris.tar_uri("gs://b/w/00.tar", "a/0") == "gs://b/w/00.tar#a/0"
    assert uris.parquet_uri("/p/train.parquet", 4) == "/p/train.parquet#4"
    assert uris.wds_member("a/0.seg.png") == ("a/0", "seg.png") and uris.wds_member("a/.x") is None


def test_parse_every_kind():
    assert uris.parse("/d/t10k-images-idx3-ubyte#3") == ("idx", "/d/t10k-images-idx3-ubyte", "3")
    assert uris.parse("gs://b/w/00.tar#a/0") == ("webdataset", "gs://b/w/00.tar", "a/0")
    assert uris.parse("/p/x.parquet#12") == ("parquet", "/p/x.parquet", "12")
    assert uris.parse("/imgs/a#b.png") == ("folder", "/imgs/a#b.png", "")
    with pytest.raises(ValueError, match="empty uri"):
        uris.parse("")


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_idx_rows_resolve_to_pixels(tmp_path, name):
    images = np.random.default_rng(1).integers(0, 256, (4, 5, 5), dtype=np.uint8)
    path = str(tmp_path / name)
    write_idx(path, images)
    np.testing.assert_array_equal(uris.resolve(uris.idx_uri(path, 2)), images[2])
    with pytest.raises(ValueError, match="has 4 rows"):
        uris.resolve(uris.idx_uri(path, 4))


def test_folder_files_resolve_to_their_bytes(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "1.png").write_bytes(_png(77))
    data = uris.resolve(uris.folder_uri(str(tmp_path / "imgs"), "cat/1.png"))
    assert (_pixels(data) == 77).all()
    with pytest.raises(FileNotFoundError):
        uris.resolve(str(tmp_path / "imgs" / "dog.png"))


def _check_tar(path):
    assert (_pixels(uris.resolve(uris.tar_uri(path, "a/0"))) == 10).all()
    assert (_pixels(uris.resolve(uris.tar_uri(path, "a/1"))) == 30).all()  # jpg before png
    assert (_pixels(uris.resolve(uris.tar_uri(path, "2"))) == 40).all()
    with pytest.raises(ValueError, match="holds no sample 'a/9'"):
        uris.resolve(uris.tar_uri(path, "a/9"))
    with pytest.raises(ValueError, match=r"sample '3' of .* has no image member \(members: txt\)"):
        uris.resolve(uris.tar_uri(path, "3"))


def _check_parquet(path):
    for row in range(5):  # rows 0-4 over row groups of 2
        assert (_pixels(uris.resolve(uris.parquet_uri(path, row))) == row * 50).all()
        assert (_pixels(uris.resolve(uris.parquet_uri(path, row), image_column="hf")) == row).all()
    with pytest.raises(ValueError, match="the file has 5 rows"):
        uris.resolve(uris.parquet_uri(path, 5))
    with pytest.raises(ValueError, match=r"no image column 'img' \(columns: image, hf, label\)"):
        uris.resolve(uris.parquet_uri(path, 0), image_column="img")


def test_tar_members_resolve(tmp_path):
    path = str(tmp_path / "shard-00.tar")
    _tar(path)
    _check_tar(path)


def test_parquet_rows_resolve(tmp_path):
    path = str(tmp_path / "train.parquet")
    _parquet(path)
    _check_parquet(path)


def test_tar_and_parquet_resolve_on_gcs(gcs_path):
    _tar(f"{gcs_path}/w/00.tar")
    _check_tar(f"{gcs_path}/w/00.tar")
    _parquet(f"{gcs_path}/p/train.parquet")
    _check_parquet(f"{gcs_path}/p/train.parquet")
