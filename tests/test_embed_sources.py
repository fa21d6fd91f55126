"""More sources on real Ray: Parquet bytes in and embeddings out through a real GCS emulator, WebDataset
tars, and an encoder actor killed mid-run (Ray restarts it and retries its shard)."""
import io
import os
import signal
import tarfile
import threading
import time

import fsspec
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipelines.embed import EmbedConfig, run_embed
from pipelines.encoders import load_encoder
from pipelines.outputs import OutputLayout, read_run
from pipelines.sources import SourceSpec, fashion_mnist


@pytest.fixture(scope="module", autouse=True)
def local_ray(gcs_emulator):
    # The emulator's address is in the environment before Ray starts; run_embed forwards it anyway.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_source_on_gcs_to_gcs_output(gcs_path):
    x, y = fashion_mnist("test")
    table = pa.table({"image": [_png(x[i]) for i in range(40)], "label": y[:40].astype(np.int64),
                      "id": [f"img{i}" for i in range(40)]})
    fs = fsspec.filesystem("gs")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    with fs.open(f"{gcs_path}/src/part-0.parquet", "wb") as f:
        f.write(sink.getvalue().to_pybytes())
    out = f"{gcs_path}/emb"
    cfg = EmbedConfig(SourceSpec(f"{gcs_path}/src", shard_size=16), out, image_size=32, batch_size=16, progress=False)
    s = run_embed(cfg)
    assert s["source"]["kind"] == "parquet" and s["shards"]["total"] == 3 and s["counts"]["embedded"] == 40
    run = read_run(out)
    assert run["ids"].tolist() == [f"src/img{i}" for i in range(40)]
    np.testing.assert_array_equal(run["labels"], y[:40])
    assert run["provenance"]["uri"][3] == f"{gcs_path}/src/part-0.parquet#3"
    # Oracle: PNG is lossless, so the encoder called directly on the pixels, decoded the same way (PIL bilinear).
    direct = load_encoder("efficientnet-lite0", 32).embed(
        np.stack([np.asarray(Image.fromarray(x[i]).convert("RGB").resize((32, 32), Image.BILINEAR))
                  for i in range(40)]))
    np.testing.assert_allclose(run["embeddings"], direct, atol=1e-4)
    assert fs.exists(f"{out}/summary.json") and fs.exists(f"{out}/run.json")
    again = run_embed(cfg)
    assert again["shards"]["written_this_run"] == 0 and again["counts"]["embedded"] == 40


def test_webdataset_tars_one_input_shard_each(tmp_path):
    x, y = fashion_mnist("train")
    (tmp_path / "wds").mkdir()
    for t in range(2):
        with tarfile.open(tmp_path / "wds" / f"train-{t:03d}.tar", "w") as tar:
            for i in range(t * 10, t * 10 + 10):
                for name, data in ((f"{i:05d}.png", _png(x[i])), (f"{i:05d}.cls", str(int(y[i])).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    s = run_embed(EmbedConfig(SourceSpec(str(tmp_path / "wds")), str(tmp_path / "out"), image_size=32,
                              progress=False))
    assert s["source"]["kind"] == "webdataset" and s["shards"]["total"] == 2 and s["counts"]["embedded"] == 20
    run = read_run(str(tmp_path / "out"))
    assert run["ids"].tolist() == [f"wds/train-{i // 10:03d}.tar/{i:05d}" for i in range(20)]
    np.testing.assert_array_equal(run["labels"], y[:20])


def _our_encoder_actors():
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if "EncoderWorker" in " ".join(p.cmdline() or [p.name()])]


def test_encoder_actor_killed_mid_run_is_restarted_and_no_row_is_lost(tmp_path):
    # Ten shards, so that the run is still going when the first one lands, however slowly Ray starts on
    # a busy machine; the killer watches until the run ends (a fixed deadline once expired under load).
    spec = SourceSpec("fashion-mnist", split="test", limit=400, shard_size=40)
    out = tmp_path / "out"
    killed, finished = [], threading.Event()

    def kill_after_first_shard():
        while not finished.is_set() and not killed:
            done = [n for n in os.listdir(out / "embeddings")] if (out / "embeddings").exists() else []
            if any(n.endswith(".parquet") for n in done):
                for p in _our_encoder_actors():
                    os.kill(p.pid, signal.SIGKILL)  # a process this test's run started, by its id
                    killed.append(p.pid)
            time.sleep(0.02)

    t = threading.Thread(target=kill_after_first_shard)
    t.start()
    try:
        s = run_embed(EmbedConfig(spec, str(out), image_size=32, batch_size=10, progress=False))
    finally:
        finished.set()
        t.join()
    assert killed, "the encoder actor was never found to kill"
    assert s["shards"]["written_this_run"] == 10 and s["counts"]["embedded"] == 400
    run = read_run(str(out))
    assert run["ids"].tolist() == [f"fashion-mnist/test/{i:05d}" for i in range(400)]
    assert len(OutputLayout(str(out)).completed()) == 10


class _CountingFile(io.RawIOBase):
    """A file that counts the bytes read through it."""

    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        return self.inner.seek(offset, whence)

    def tell(self):
        return self.inner.tell()

    def read(self, n=-1):
        data = self.inner.read(n)
        self.counter[0] += len(data)
        return data

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def close(self):
        self.inner.close()
        super().close()


def test_a_parquet_shard_reads_only_its_row_groups(tmp_path, monkeypatch):
    from memory import storage
    from pipelines.sources import open_source

    # 10 row groups of 20 rows, 10 kB of incompressible "image" bytes per row: 2 MB in all.
    rng = np.random.default_rng(5)
    payloads = [rng.bytes(10_000) for _ in range(200)]
    path = tmp_path / "src" / "part.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": payloads, "label": np.arange(200) % 7, "id": [f"r{i}" for i in range(200)]}),
                   path, row_group_size=20, compression="none")
    size = path.stat().st_size
    assert pq.ParquetFile(path).metadata.num_row_groups == 10
    source = open_source(SourceSpec(str(tmp_path / "src"), shard_size=30))
    shards = source.shards()
    assert [s.items[1:] for s in shards] == [(a, min(200, a + 30)) for a in range(0, 200, 30)]

    counter = [0]
    real = storage.filesystem

    class CountingFS:
        def __init__(self, fs):
            self.fs = fs

        def open(self, p, mode="rb"):
            return _CountingFile(self.fs.open(p, mode), counter)

    monkeypatch.setattr("pipelines.sources.parquet.storage.filesystem",
                        lambda uri: (CountingFS(real(uri)[0]), real(uri)[1]))
    for shard in shards:
        counter[0] = 0
        records = list(source.read(shard))
        a, b = shard.items[1:]
        # Oracle: the shard's own rows, in order, with their bytes and labels.
        assert [r.id for r in records] == [f"src/r{i}" for i in range(a, b)]
        assert [r.payload for r in records] == payloads[a:b]
        assert [r.label for r in records] == [i % 7 for i in range(a, b)]
        # Rows a..b span at most 3 row groups of 20 rows (30 rows, unaligned): at most 3/10 of the file plus the
        # footer, where reading the whole file once per shard (as before) reads all of it.
        groups = len(range(a // 20, (b - 1) // 20 + 1))
        assert counter[0] < size * (groups + 0.5) / 10, (shard.items, counter[0], size)
