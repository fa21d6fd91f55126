"""Storage modes: each round-trips on local disk and gs://, quantised exact search stays within its
error bound of a float32 oracle, and add and compact keep a memory's mode."""
import numpy as np
import pytest

from conftest import clustered, oracle_topk
from memory import Memory, quantize, schema, write_memory
from memory import manifest as mf
from memory.info import memory_info
from memory.mutations import remove_items
from memory.shard import read_vectors
from pipelines.build import add_to_memory
from pipelines.compact import compact_memory

PIPE = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
CLASSES = ["a", "b", "c", "d"]
# (backend, mode) pairs: every ScaNN mode, and the exact backend's quantised ones.
CASES = [("scann", m) for m in quantize.MODES if m != "pca"] + [("exact", m) for m in ("float16", "int8", "pca")]
# Files of a ScaNN shard's reorder data: float32 only in float32 mode, none in codes mode.
REORDER = {"float32": "scann/dataset.npy", "float16": "scann/bfloat16_dataset.npy", "int8": "scann/int8_dataset.npy"}


def test_quantisers_round_trip_within_their_bounds():
    x, _ = clustered(500, 33, 5, seed=3)  # odd dimension: the 4-bit codes pad half a byte
    for mode, bound in (("float32", 0), ("float16", 1e-3), ("int8", 0.02), ("codes", 0.35)):
        arrays = quantize.encode(x, mode)
        assert arrays["vectors"].nbytes == len(x) * {"float32": 132, "float16": 66, "int8": 33, "codes": 17}[mode]
        back = quantize.decode(arrays, mode, 33)
        assert back.shape == x.shape and np.linalg.norm(back - x, axis=1).max() <= bound
        # Stable under a rebuild: re-encoding the decoded, re-normalised rows gives the same codes.
        again = quantize.encode(back / np.linalg.norm(back, axis=1, keepdims=True), mode)
        if mode in ("int8", "codes"):
            np.testing.assert_array_equal(again["vectors"], arrays["vectors"])
    with pytest.raises(ValueError, match="'codes' keeps only ScaNN's hashing codes: use --backend scann"):
        quantize.check_mode("codes", "exact")
    with pytest.raises(ValueError, match="unknown storage mode 'int4'"):
        quantize.check_mode("int4")
    with pytest.raises(ValueError, match="'pca' is scored by the exact backend: use --backend exact"):
        quantize.check_mode("pca", "scann")


def test_pca_codes_fill_an_eighth_of_float32_and_score_without_decoding():
    from memory import transform_codes as tc

    rng = np.random.default_rng(4)
    # Anisotropic, off-centre data (like image embeddings): variances fall off along the axes.
    x = (rng.standard_normal((20_000, 48)) * np.geomspace(1.0, 0.01, 48) + 0.3).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    book = tc.fit(x)
    codes = tc.encode(x, book)
    share = sum(v.nbytes for v in book.values()) / len(x)
    assert codes.shape == (len(x), tc.code_bytes(book)) and codes.dtype == np.uint8
    assert codes.shape[1] + share <= 4 * 48 / 8  # codes and the codebook's share: an eighth of float32
    assert codes.shape[1] >= 0.8 * 4 * 48 / 8  # ... and most of that eighth is codes
    bits = book["bits"].astype(int)
    assert bits.max() <= tc.MAX_BITS and bits[0] == bits.max() > bits[-1]  # the leading axes get the most bits
    # The bitstreams read back the level each value was nearest to.
    y = (x[:500] - book["mean"]) @ book["rotation"].astype(np.float32)
    for j in (0, 1, len(bits) - 1):
        lv = book["levels"][book["level_start"][j]:book["level_start"][j] + 2 ** bits[j]]
        np.testing.assert_array_equal(tc.level_numbers(codes[:500], book)[:, j], np.abs(y[:, j, None] - lv).argmin(1))
    # Scoring on the kept axes equals the dot product with the full reconstruction.
    q = x[-5:]
    qp, bias = tc.project_queries(q, book)
    np.testing.assert_allclose(qp @ tc.components(codes, book).T + bias[:, None], q @ tc.decode(codes, book).T,
                               atol=1e-5)
    # More bits, less error; the 4-bit-a-dimension default beats per-vector int4 at fewer bytes.
    err = {b: np.linalg.norm(tc.decode(tc.encode(x, bk := tc.fit(x, b)), bk) - x, axis=1).mean() for b in (96, 192)}
    int4 = np.linalg.norm(quantize.decode(quantize.encode(x, "codes"), "codes", 48) - x, axis=1).mean()
    assert err[192] < err[96] / 2 and np.linalg.norm(tc.decode(codes, book) - x, axis=1).mean() < int4
    with pytest.raises(ValueError, match="non-empty"):
        tc.fit(np.zeros((0, 4), np.float32))


@pytest.mark.parametrize("where", ["local", "gcs"])
@pytest.mark.parametrize("backend,mode", CASES)
def test_each_mode_round_trips(tmp_path, gcs_path, where, backend, mode):
    x, labels = clustered(700, 16, 4, seed=11)
    ids = np.array([f"r-{i:04d}" for i in range(700)], dtype=object)
    root = str(tmp_path / "m") if where == "local" else gcs_path
    write_memory(root, x, labels, ids, num_shards=2, backend=backend, storage=mode, class_names=CLASSES)
    m = mf.read_manifest(root)
    for entry in m.shards:
        assert entry.params["storage"] == mode
        assert ("embedding_scales.npy" in entry.files) == (mode in ("int8", "codes"))
        assert ("embedding_codebook.npz" in entry.files) == (mode == "pca")
        if backend == "scann":
            assert all(f not in entry.files for other, f in REORDER.items() if other != mode)
            assert (REORDER.get(mode) in entry.files) if mode != "codes" else True
        # The stored copy decodes to the vectors it came from, within the mode's rounding.
        rows = np.arange(5)
        stored_ids = sorted(ids[[i for i in range(700) if _shard_of(m, ids[i]) == entry.name]])[:5]
        want = x[[int(i[2:]) for i in stored_ids]]
        got = read_vectors(root, entry, rows)
        # (pca: 350 items a shard get 2 bits a dimension, the floor; 1,000s of items get about 4)
        bound = {"float32": 1e-6, "float16": 1e-3, "int8": 0.01, "codes": 0.1, "pca": 0.5}[mode]
        assert np.abs(got - want).max() <= bound
    q = x[:30] + 0.01
    want, _ = oracle_topk(q, x, ids, 5)
    with Memory.open(root) as mem:
        nb = mem.search(q, 5)
    assert np.mean(nb.ids[:, 0] == want[:, 0]) >= 0.9  # each query's own item (nearly always) first
    assert memory_info(root, measure_ram=False)["storage"] == [mode]


def test_info_measures_bytes_per_item_by_part(tmp_path):
    x, labels = clustered(3000, 64, 4, seed=13)
    ids = [f"b-{i:05d}" for i in range(3000)]
    sizes = {}
    for mode in ("float32", "int8", "codes"):
        root = str(tmp_path / mode)
        write_memory(root, x, labels, ids, backend="scann", storage=mode, class_names=CLASSES, target_recall=None)
        sizes[mode] = memory_info(root)["bytes_per_item"]
    f32, i8, codes = sizes["float32"], sizes["int8"], sizes["codes"]
    # Disk, from the files: float32 keeps its stored copy and ScaNN's float32 reorder copy (256 bytes each at 64-d).
    assert f32["disk"]["vectors"] >= 256 and f32["disk"]["reorder"] >= 256
    assert 64 < i8["disk"]["reorder"] < 70 and 68 <= i8["disk"]["vectors"] < 75
    assert codes["disk"]["reorder"] == 0 and 36 <= codes["disk"]["vectors"] < 40
    assert codes["disk"]["total"] < f32["disk"]["total"] / 4
    # RAM, measured by loading the largest shard in a fresh process: ScaNN's reorder copy shows (256 bytes
    # a row in float32, 64 in int8) on top of fixed costs that dominate at 3,000 items (benchmarks/storage.py
    # measures 1M).
    assert f32["ram"]["index"] - i8["ram"]["index"] > 150 and codes["ram"]["index"] > 0
    assert f32["ram"]["items"] > 0 and f32["ram"]["measured_on"] == "shard-00000-of-00001"


def _shard_of(manifest, item_id):
    from memory.partition import hash_partition

    s = int(hash_partition(np.array([item_id], dtype=object), manifest.partitioning.num_shards)[0])
    return mf.shard_name(s, manifest.partitioning.num_shards)


@pytest.mark.parametrize("mode", ["float16", "int8"])
def test_quantised_exact_search_is_within_its_bound_of_a_float32_oracle(tmp_path, mode):
    """Stated bound: scores are exact for the stored vectors, each within eps = max_i ||x_i - x^_i||
    of the float32 score; so every returned item's true similarity is at least the oracle's k-th
    minus 2 * eps, and each returned similarity is within eps of the item's true one."""
    x, labels = clustered(3000, 32, 10, seed=21, noise=0.5)
    ids = np.array([f"e-{i:05d}" for i in range(3000)], dtype=object)
    q, _ = clustered(100, 32, 10, seed=21, noise=0.5)
    write_memory(str(tmp_path / "m"), x, labels, ids, num_shards=3, storage=mode,
                 class_names=[str(i) for i in range(10)])
    eps = float(quantize.max_error(x, mode).max()) + 1e-5
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    true = qn @ x.T
    k = 20
    kth = np.sort(true, axis=1)[:, -k]
    with Memory.open(str(tmp_path / "m")) as mem:
        nb = mem.search(q, k)
    rows = np.vectorize(lambda i: int(i[2:]))(nb.ids)
    got_true = np.take_along_axis(true, rows, 1)
    assert (got_true >= kth[:, None] - 2 * eps).all()
    assert np.abs(nb.sims - got_true).max() <= eps
    want, _ = oracle_topk(q, x, ids, k)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(nb.ids, want)])
    assert overlap >= (0.99 if mode == "float16" else 0.9)
    assert mf.read_manifest(str(tmp_path / "m")).shards[0].params["recall"] <= 1.0


def test_add_and_compact_keep_a_codes_memory_on_a_tree(tmp_path):
    """20,500 items in one ScaNN shard: a tree (not brute force) searching on its 4-bit codes."""
    x, labels = clustered(21_000, 16, 8, seed=31)
    labels = labels % 4
    ids = np.array([f"c-{i:05d}" for i in range(21_000)], dtype=object)
    root = str(tmp_path / "m")
    write_memory(root, x[:20_500], labels[:20_500], ids[:20_500], backend="scann", storage="codes",
                 class_names=CLASSES, target_recall=0.9)
    first = mf.read_manifest(root).shards[0]
    assert not first.params["brute_force"] and first.params["reorder"] == 0
    assert "scann/hashed_dataset.npy" in first.files and not any(f.startswith("scann/dataset") for f in first.files)
    new = str(tmp_path / "new.parquet")
    schema.write_embeddings(new, schema.embedding_table(ids[20_500:], x[20_500:], labels[20_500:]))
    assert add_to_memory(root, new, pipeline_args=PIPE)["items_added"] == 500
    remove_items(root, ids=list(ids[:50]))
    summary = compact_memory(root, pipeline_args=PIPE)
    assert summary["changed"] and summary["items_dropped"] == 50 and summary["shards"] == 1
    m = mf.read_manifest(root)
    (entry,) = m.shards
    assert entry.count == 20_950 and entry.params["storage"] == "codes" and not entry.params["brute_force"]
    assert entry.params["target_recall"] == 0.9 and 0 < entry.params["recall"] <= 1
    assert "embedding_scales.npy" in entry.files and "scann/dataset.npy" not in entry.files
    # The compacted shard was rebuilt from the 4-bit copy: it still holds every live vector, close to the original.
    got = read_vectors(root, entry, np.arange(entry.count))
    assert got.shape == (20_950, 16)
    q = x[20_600:20_700]
    with Memory.open(root) as mem:
        nb = mem.search(q, 10)
    assert not set(nb.ids.ravel()) & set(ids[:50])
    found = [i in row for i, row in zip(ids[20_600:20_700], nb.ids)]
    assert np.mean(found) >= 0.95  # each added item is among its own 10 nearest, searched on 4-bit codes


def test_codes_needs_scann_and_the_cli_names_the_mode(tmp_path):
    x, labels = clustered(50, 8, 2, seed=5)
    with pytest.raises(ValueError, match="'codes' keeps only ScaNN's hashing codes"):
        write_memory(str(tmp_path / "m"), x, labels, [f"i{i}" for i in range(50)], storage="codes",
                     class_names=["a", "b"])
    with pytest.raises(ValueError, match="target recall must be a number in \\(0, 1\\], got 1.5"):
        write_memory(str(tmp_path / "m"), x, labels, [f"i{i}" for i in range(50)], target_recall=1.5,
                     class_names=["a", "b"])


def test_pca_exact_memory_agrees_with_a_float32_oracle_and_add_and_compact_keep_it(tmp_path):
    """Stated bound, as for int8: scores are exact for the reconstructions, each within
    eps = max_i ||x_i - x^_i|| of the float32 score. And the votes: rank voting (k = 50) agrees with a
    float32 memory on at least 97% of queries here (a 64-d, 24,000-item shard gets about 3.9 bits a dimension)."""
    x, labels = clustered(24_800, 64, 12, seed=41, noise=1.2)
    q, x, labels = x[24_500:], x[:24_500], labels[:24_500]  # held-out queries from the same clusters
    ids = np.array([f"p-{i:05d}" for i in range(24_500)], dtype=object)
    names = [str(i) for i in range(12)]
    root, ref = str(tmp_path / "pca"), str(tmp_path / "f32")
    write_memory(root, x[:24_000], labels[:24_000], ids[:24_000], backend="exact", storage="pca", class_names=names)
    write_memory(ref, x[:24_000], labels[:24_000], ids[:24_000], backend="exact", class_names=names)
    entry = mf.read_manifest(root).shards[0]
    assert entry.params["storage"] == "pca" and 0 < entry.params["recall"] <= 1
    disk = memory_info(root, measure_ram=False)["bytes_per_item"]["disk"]["vectors"]
    assert disk <= 4 * 64 / 8  # an eighth of float32, codebook included
    from memory import transform_codes as tc

    from memory.shard import local_shard, read_local_vectors

    with local_shard(root, entry) as local:  # the reconstructions the scores are exact for (rows in id order)
        eps = float(np.linalg.norm(read_local_vectors(local, entry) - x[:24_000], axis=1).max()) + 1e-4
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    true = qn @ x[:24_000].T
    k = 50
    kth = np.sort(true, axis=1)[:, -k]
    with Memory.open(root) as mem, Memory.open(ref) as oracle:
        nb = mem.search(q, k)
        agree = np.mean(mem.classify(q, k, "rank").predictions == oracle.classify(q, k, "rank").predictions)
    rows = np.vectorize(lambda i: int(i[2:]))(nb.ids)
    got_true = np.take_along_axis(true, rows, 1)
    assert (got_true >= kth[:, None] - 2 * eps).all() and np.abs(nb.sims - got_true).max() <= eps
    assert agree >= 0.97
    assert tc.budget_bits(24_000, 64) >= 3.5 * 64
    # add, remove and compact keep the mode; the compacted shard is fitted again on the decoded vectors.
    new = str(tmp_path / "new.parquet")
    schema.write_embeddings(new, schema.embedding_table(ids[24_000:], x[24_000:], labels[24_000:]))
    assert add_to_memory(root, new, pipeline_args=PIPE)["items_added"] == 500
    assert all(e.params["storage"] == "pca" for e in mf.read_manifest(root).shards)
    remove_items(root, ids=list(ids[:50]))
    summary = compact_memory(root, pipeline_args=PIPE)
    assert summary["changed"] and summary["items_dropped"] == 50
    m = mf.read_manifest(root)
    assert all(e.params["storage"] == "pca" and "embedding_codebook.npz" in e.files for e in m.shards)
    assert sum(e.count for e in m.shards) == 24_450
    with Memory.open(root) as mem:
        nb = mem.search(x[24_000:24_100], 10)
    assert not set(nb.ids.ravel()) & set(ids[:50])
    assert np.mean([i in row for i, row in zip(ids[24_000:24_100], nb.ids)]) >= 0.95  # added items find themselves
