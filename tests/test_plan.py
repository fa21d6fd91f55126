"""``vismem plan``: units, bad input, figures that follow from the calibration, JSON, and --calibrate."""
import json
import math

import numpy as np
import pytest

from cli.main import main
from deploy import plan as pl
from deploy.rates import FORMAT, fit_size, parse_calibration
from memory.partition import BLOCK_SIMILARITIES


def _fit(model, a, b, unit=""):
    return {"model": model, "a": a, "b": b, "rel_err": 0.0, "n_min": 1e5, "n_max": 1e7, "unit": unit}


def hand_calibration() -> dict:
    """Round numbers at dim 100, so that every figure of the plan below can be computed by hand."""
    return {
        "format": FORMAT, "dim": 100, "shard_items": 100_000, "cores": 2, "about": {},
        "figures": {
            "worker_rss": _fit("linear", 1e9, 1000.0, "worker RSS B"),  # 1 GB + 1 kB per shard item at dim 100
            "build_cpu_s": _fit("linear", 0.0, 1e-4),           # 0.1 ms of CPU per item
            "build_wall_s": _fit("linear", 60.0, 5e-5),         # 60 s fixed
            "driver_rss": _fit("constant", 2e9, 0.0),
            "input_bytes_per_item": _fit("constant", 420.0, 0.0),  # 4 B x 100 dims + 20
            "serve_base_rss": _fit("constant", 1e9, 0.0),
            "open_s": _fit("linear", 1.0, 1e-6),
            "remove_s": _fit("linear", 0.5, 1e-8),
        },
        "query": {"0.95": {"cpu_s": _fit("linear", 0.0, 1e-11), "latency_s": _fit("constant", 1e-3, 0.0)},
                  "0.99": {"cpu_s": _fit("linear", 0.0, 3e-11), "latency_s": _fit("constant", 2e-3, 0.0)}},
        "storage": {"float32": {"disk_per_dim": 8.0, "disk_fixed": 20.0, "ram_per_dim": 5.0, "ram_fixed": 100.0},
                    "int8": {"disk_per_dim": 1.0, "disk_fixed": 20.0, "ram_per_dim": 1.0, "ram_fixed": 100.0,
                             "build_factor": 1.5, "query_factor": 0.5, "max_recall": 0.97}},
        "dim_exponent": {"build": 1.0, "query": 1.0},
        "encoder": None,
    }


@pytest.fixture
def cal_file(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(hand_calibration()))
    return str(path)


def test_units():
    assert pl.parse_count("1e9") == 10**9
    assert pl.parse_count("10M") == 10_000_000
    assert pl.parse_count("2.5k") == 2500
    assert pl.parse_count("1_000_000") == 10**6
    assert pl.parse_bytes("64GB") == 64 * 10**9
    assert pl.parse_bytes("512GiB") == 512 * 2**30
    assert pl.parse_bytes("1.5T") == 1.5e12
    assert pl.parse_machine("ram=64GB, cores=16") == pl.Machine(16, 64 * 10**9)


@pytest.mark.parametrize("value", ["-5", "0", "abc", "1e20", "2.5"])
def test_bad_counts(value):
    with pytest.raises(ValueError, match="--items"):
        pl.parse_count(value)


def test_plan_figures_follow_from_the_calibration():
    """1e8 items x 200-d, float32, 10,000 q/s on cores=4,ram=40GB machines, computed by hand."""
    cal = parse_calibration(hand_calibration(), "hand")
    req = pl.Request(items=10**8, dim=200, storage="float32", recall=0.95, qps=10_000,
                     machine=pl.Machine(4, 40 * 10**9), gpus=2, encoder_rate=500.0)
    p = pl.make_plan(req, cal)
    # Worker share 10 GB; 80% of it minus 1 GB fixed, at 2 kB per item (dim 200) = 3.5M items > the 1M cap.
    assert p.value("shards") == 100
    assert p.value("disk_bytes") == pytest.approx(1e8 * (8 * 200 + 20))
    assert p.value("gcs_bytes") == pytest.approx(1e8 * (8 * 200 + 20) + 1e8 * (420 - 400 + 800))
    # RAM 1e8 x 1,100 B over (0.75 x 40 GB - 1 GB) = 3.8 -> 4 machines; CPU per query 1e-11 x 1e8 x 2 = 2 ms,
    # 4 cores -> 2,000 q/s per machine -> 5 machines for 10,000 q/s.
    assert p.value("serving_machines") == 5
    assert p.value("query_capacity") == pytest.approx(10_000)
    # 1 ms measured alone, plus the CPU per query beyond the largest memory measured (1e7 items, dim 100).
    assert p.value("latency") == pytest.approx(1e-3 + (2e-3 - 1e-11 * 1e7))
    assert p.value("build_core_hours") == pytest.approx(1e-4 * 1e8 * 2 / 3600)
    assert p.value("build_wall_hours") == pytest.approx((60 + 2e4 / 20) / 3600)  # 20 workers = 5 machines x 4
    assert p.value("embedding_gpu_hours") == pytest.approx(1e8 / 500 / 3600)
    assert p.value("open_seconds") == pytest.approx(1.0 + 1e-6 * 1e8 / 5)
    int8 = pl.make_plan(pl.Request(items=10**8, dim=200, storage="int8", recall=0.9, qps=10_000,
                                   machine=pl.Machine(4, 40 * 10**9)), cal)
    assert int8.value("disk_bytes") == pytest.approx(1e8 * 220)
    assert int8.value("build_core_hours") == pytest.approx(1e-4 * 1e8 * 2 * 1.5 / 3600)


def test_the_build_driver_and_the_kmeans_worker():
    """The driver follows its fit; the k-means step's one worker holds the default sample once (float32)
    and one block of similarities on top of a worker's fixed RSS, and stops growing at the sample's cap."""
    d = hand_calibration()
    d["figures"]["driver_rss"] = _fit("linear", 5e8, 50.0)
    cal = parse_calibration(d, "hand")
    small, huge = (pl.make_plan(pl.Request(items=n, dim=100, storage="float32", recall=0.95, qps=10,
                                           machine=pl.Machine(16, 64 * 10**9)), cal) for n in (10**7, 10**9))
    assert small.value("build_driver_ram") == pytest.approx(5e8 + 50.0 * 1e7)
    assert huge.value("build_driver_ram") == pytest.approx(5e8 + 50.0 * 1e9)
    fixed = cal.figure("worker_rss").a
    shards = small.value("shards")
    rows = max(100_000, min(1_000_000, 256 * 16 * shards))
    assert small.value("kmeans_worker_ram") == pytest.approx(fixed + 4 * rows * 100 + 4 * BLOCK_SIMILARITIES)
    assert huge.value("kmeans_worker_ram") == pytest.approx(fixed + 4 * 1_000_000 * 100 + 4 * BLOCK_SIMILARITIES)


def test_cli_json_parses(cal_file, capsys):
    rc = main(["plan", "--items", "1e8", "--dim", "200", "--storage", "int8", "--recall", "0.95", "--qps", "500",
               "--machine", "cores=4,ram=40GB", "--calibration", cal_file, "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["figure"]: r for r in out["rows"]}
    assert rows["shards"]["value"] == 100 and "worker RSS" in rows["shards"]["source"]
    assert rows["query_capacity"]["value"] >= 500


def test_cli_table(cal_file, capsys):
    assert main(["plan", "--items", "10M", "--dim", "100", "--machine", "cores=2,ram=16GiB",
                 "--calibration", cal_file]) == 0
    out = capsys.readouterr().out
    assert "| serving_machines |" in out and "| figure | value | from (measured rate) |" in out


@pytest.mark.parametrize("args, words", [
    (["--items=-5"], "--items must be positive"),
    (["--items", "1e20"], "check the exponent"),
    (["--items", "1e9", "--storage", "codes"], "no rates for storage mode 'codes'"),
    (["--items", "1e9", "--storage", "pca"], "exists for exact (brute-force) memories only"),
    (["--items", "1e9", "--machine", "cores=16"], "missing ram"),
    (["--items", "1e9", "--machine", "cores=x,ram=64GB"], "cores must be a whole number"),
    (["--items", "1e9", "--machine", "16,64GB"], "expected --machine cores=N,ram=SIZE"),
    (["--items", "1e9", "--recall", "0.999"], "above the highest recall"),
    (["--items", "1e9", "--storage", "int8", "--recall", "0.99"], "reached recall@10 0.970 at most"),
    (["--items", "1e9", "--gpus", "8"], "--gpus needs an encoder rate"),
    (["--items", "1e9", "--dim", "-3"], "--dim must be positive"),
])
def test_bad_input_is_one_line_exit_2(cal_file, capsys, args, words):
    # The defaults first: a repeated option's last value wins.
    argv = ["plan", "--dim", "768", "--machine", "cores=16,ram=64GB", *args, "--calibration", cal_file]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vismem plan: error:") and words in err, err


def test_missing_or_malformed_calibration(tmp_path, capsys):
    argv = ["plan", "--items", "1e9", "--dim", "768", "--machine", "cores=16,ram=64GB", "--calibration"]
    assert main([*argv, str(tmp_path / "none.json")]) == 2
    assert "no calibration file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": FORMAT, "dim": 128}))
    assert main([*argv, str(bad)]) == 2
    assert "missing" in capsys.readouterr().err


def test_shipped_calibration_plans_a_billion(capsys):
    assert main(["plan", "--items", "1e9", "--dim", "768", "--storage", "float32", "--qps", "1000",
                 "--machine", "cores=16,ram=64GB", "--json"]) == 0
    rows = {r["figure"]: r["value"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["shards"] >= 1000 and rows["serving_machines"] >= 1 and math.isfinite(rows["build_core_hours"])


def test_fit_picks_the_model_that_fits():
    ns = [1e5, 1e6, 1e7]
    assert fit_size(ns, [3 + 2 * n for n in ns]).model == "linear"
    assert fit_size(ns, [3 + 2 * n * math.log(n) for n in ns]).model == "nlogn"
    assert fit_size(ns, [5.0, 5.0, 5.0]).model == "constant"


def test_calibrate_writes_a_file_plan_reads(tmp_path, capsys):
    """A tiny real ladder (Beam builds, ScaNN, searches): 3k- and 6k-item shards, so it stays quick."""
    out = str(tmp_path / "mine.json")
    assert main(["plan", "--calibrate", "--calibration", out, "--sizes", "3k,6k", "--shard-items", "6k",
                 "--dim", "16", "--mode-items", "3k", "--modes", "float32,int8", "--queries", "100",
                 "--work-dir", str(tmp_path / "w")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["points"] == 2 and {"float32", "int8"} <= set(summary["storage_modes"])
    cal = json.loads(open(out).read())
    # Measured, not assumed: both builds' peak RSS are there, and the fit is theirs (a 6k-item shard's
    # RSS may not rise above the noise of a worker's ~250 MB, hence constant or linear).
    assert [p["worker_rss"] > 50 * 2**20 for p in cal["ladder"]] == [True, True]
    assert cal["figures"]["worker_rss"]["model"] in ("constant", "linear")
    assert main(["plan", "--items", "1e6", "--dim", "16", "--machine", "cores=2,ram=8GB", "--calibration", out,
                 "--json"]) == 0
    rows = {r["figure"]: r["value"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["disk_bytes"] > 1e6 * 16 * 4  # at least the float32 vectors
    assert main(["plan", "--items", "1e6", "--dim", "16", "--storage", "codes", "--machine", "cores=2,ram=8GB",
                 "--calibration", out]) == 2
    assert "no rates for storage mode 'codes' (it has: float32, int8)" in capsys.readouterr().err


def test_ladder_memories_grow_at_constant_density():
    """One cluster per 1,000 items at every size (never fewer than the 1,000 classes), and a larger
    ladder memory keeps the smaller one's centres: sizes differ in extent, not in how crowded a
    query's neighbourhood is."""
    from deploy.ladder import CLUSTERS, cluster_centres, clusters_for, synthetic_queries

    assert [clusters_for(n) for n in (3_000, 250_000, 1_000_000, 2_500_000, 10_000_000)] == [
        CLUSTERS, CLUSTERS, 1_000, 2_500, 10_000]
    small, large = cluster_centres(16, 0, 1_000), cluster_centres(16, 0, 2_500)
    np.testing.assert_array_equal(large[:1_000], small)
    q = synthetic_queries(4_000, 16, n=2_500_000)
    nearest = (q @ (large / np.linalg.norm(large, axis=1, keepdims=True)).T).argmax(1)
    assert (nearest >= 1_000).mean() > 0.5  # queries come from the larger memory's clusters too


def test_routing_over_the_cells_is_added_per_query():
    """With a measured routing rate, each query also pays 2 x cells x dim flops: 100 shards of 1M items have
    the default 1,600 cells (16 per shard); at dim 200 and 1e9 flops per CPU-second that is 0.64 ms."""
    d = hand_calibration()
    req = pl.Request(items=10**8, dim=200, storage="float32", recall=0.95, qps=10_000, machine=pl.Machine(4, 40 * 10**9))
    plain = pl.make_plan(req, parse_calibration(d, "hand"))
    d["routing"] = {"flops_per_cpu_s": 1e9}
    routed = pl.make_plan(req, parse_calibration(d, "hand"))
    cells = 1600
    cpu_plain = 4 / (plain.value("query_capacity") / plain.value("serving_machines"))
    cpu_routed = 4 / (routed.value("query_capacity") / routed.value("serving_machines"))
    assert cpu_plain == pytest.approx(2e-3)
    assert cpu_routed == pytest.approx(2e-3 + 2 * cells * 200 / 1e9)
    d["routing"] = {"flops_per_cpu_s": -1}
    with pytest.raises(ValueError, match="routing.flops_per_cpu_s must be a number > 0"):
        parse_calibration(d, "hand")


def test_envelope_is_the_costliest_size():
    from deploy.rates import envelope_fit

    fit = envelope_fit([1e5, 1e6, 1e7], [2.0, 4.0, 3.0], unit="CPU s/query")
    assert fit.model == "constant" and fit.at(1e9) == 4.0 and fit.at(1) == 4.0
    assert "costliest measured size" in fit.source
    with pytest.raises(ValueError, match="as many sizes as values"):
        envelope_fit([1.0], [])
