"""memory.schema: the embedding shard and items table contracts, their readers and writers."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memory import schema


def _shard(path, n=5, dim=4, start=0, dtype="float32", **kw):
    rng = np.random.default_rng(start)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    ids = [f"s/{start + i}" for i in range(n)]
    schema.write_embeddings(str(path), schema.embedding_table(ids, x, np.arange(n) % 3, dtype=dtype, **kw))
    return ids, x


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding_shard_round_trip(tmp_path, dtype):
    prov = {"label_source": np.array(["teacher"] * 5, dtype=object), "confidence": np.linspace(0.5, 1, 5),
            "source": np.array(["fm"] * 5, dtype=object), "uri": np.array([f"u#{i}" for i in range(5)], dtype=object)}
    ids, x = _shard(tmp_path / "e.parquet", dtype=dtype, provenance=prov, metadata={"encoder": "enc", "image_size": 32})
    back = schema.read_embeddings(str(tmp_path / "e.parquet"))
    assert back["ids"].tolist() == ids and back["labels"].tolist() == [0, 1, 2, 0, 1]
    np.testing.assert_allclose(back["embeddings"], x.astype(dtype), rtol=0)
    assert back["embeddings"].dtype == np.float32
    assert back["metadata"] == {"dim": "4", "normalisation": "l2", "encoder": "enc", "image_size": "32"}
    assert back["provenance"]["label_source"].tolist() == ["teacher"] * 5
    np.testing.assert_allclose(back["provenance"]["confidence"], np.linspace(0.5, 1, 5), rtol=1e-6)
    assert pq.read_schema(str(tmp_path / "e.parquet")).field("embedding").type == pa.list_(
        pa.float16() if dtype == "float16" else pa.float32(), 4)


def test_missing_provenance_columns_take_defaults(tmp_path):
    table = pa.table({"id": ["a", "b"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0, 0, 1]), 2),
                      "label": pa.array([0, -1], pa.int32())})
    pq.write_table(table, tmp_path / "bare.parquet")
    back = schema.read_embeddings(str(tmp_path / "bare.parquet"))
    assert back["provenance"]["label_source"].tolist() == ["human", "human"]
    assert back["provenance"]["source"].tolist() == ["", ""]
    assert back["provenance"]["confidence"].dtype == np.float32


def test_bad_embedding_shards_are_named(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "label": [1]}), tmp_path / "noemb.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['embedding'\]"):
        schema.read_embeddings(str(tmp_path / "noemb.parquet"))
    pq.write_table(pa.table({"id": ["a"], "embedding": [[1.0, 2.0]], "label": [1]}), tmp_path / "var.parquet")
    with pytest.raises(ValueError, match="must be a fixed-size list of floats"):
        schema.read_embeddings(str(tmp_path / "var.parquet"))
    with pytest.raises(FileNotFoundError, match="embedding shard not found"):
        schema.read_embeddings(str(tmp_path / "none.parquet"))
    with pytest.raises(ValueError, match="float32 or float16"):
        schema.embedding_schema(4, "float64")


def test_shard_files_and_concatenation(tmp_path):
    d = tmp_path / "emb"
    d.mkdir()
    ids_b, _ = _shard(d / "b.parquet", start=10)
    ids_a, x_a = _shard(d / "a.parquet", start=0)
    (d / "notes.txt").write_text("not a shard")
    assert schema.shard_files(str(d)) == [f"{d}/a.parquet", f"{d}/b.parquet"]
    assert schema.shard_files([str(d / "b.parquet"), f"{d}/a*.parquet"]) == [str(d / "b.parquet"), f"{d}/a.parquet"]
    with pytest.raises(FileNotFoundError, match="no embedding shards match .*empty\\*"):
        schema.shard_files(str(tmp_path / "empty*"))
    with pytest.raises(FileNotFoundError, match="embedding shard not found: .*none.parquet"):
        schema.shard_files(str(d / "none.parquet"))
    (tmp_path / "void").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no embedding shards match .*void/\*.parquet"):
        schema.shard_files(str(tmp_path / "void"))
    (d / "sub").mkdir()  # a folder means its top-level shards only
    _shard(d / "sub" / "z.parquet", start=50)
    both = schema.read_embedding_shards(str(d))
    assert both["ids"].tolist() == ids_a + ids_b  # in file order
    np.testing.assert_array_equal(both["embeddings"][:5], x_a)
    assert len(both["provenance"]["uri"]) == 10
    _shard(d / "c.parquet", dim=6, start=20)
    with pytest.raises(ValueError, match=r"disagree on the dimension: \[4, 6\]"):
        schema.read_embedding_shards(str(d))
    with pytest.raises(ValueError, match="no embedding shards to concatenate"):
        schema.concat_embeddings([])


def test_items_table_schema():
    t = schema.items_table(["a", "b"], [1, 0], [1.0, 0.5], schema.default_provenance(2))
    assert t.schema == schema.ITEMS_SCHEMA
    assert t.column("label").to_pylist() == [1, 0] and t.column("label_source").to_pylist() == ["human", "human"]
