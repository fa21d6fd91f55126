"""The calibration file of ``vismem plan``: measured rates, their fits to size, and reading them.

A calibration (JSON, ``format: vismem-calibration/1``) is written by ``benchmarks/scale.py`` or
``vismem plan --calibrate`` from measured ladder points; ``deploy/calibration.json`` ships one. It holds:

- ``figures``: each measured figure fitted to size as ``a + b*n`` (linear) or ``a + b*n*ln(n)``
  (n log n), the model with the smaller relative error, with the range it was measured over;
- ``query``: per recall target, the CPU seconds per query and the one-query latency, fitted to size;
- ``storage``: per storage mode, bytes per item on disk and in RAM as ``per_dim * dim + fixed``,
  measured at two dimensions, and the mode's build and query cost relative to float32;
- ``dim_exponent``: how build and query cost grew with the dimension (measured at two dimensions);
- ``encoder``: a measured images/s of the encoder, when one was measured.

Pure: the only I/O is :func:`load_calibration`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from memory.exact_index import EXACT_MODES
from memory.scann_index import DIMS_PER_BLOCK

FORMAT = "vismem-calibration/1"
EXACT_ONLY_MODES = tuple(m for m in EXACT_MODES if m not in DIMS_PER_BLOCK)  # pca: no ScaNN index
MIN_CPU_S = 0.5  # the least CPU time a cost ratio between two dimensions is taken from
MODELS = ("linear", "nlogn")


def _g(model: str, n: float) -> float:
    if model == "constant":
        return 0.0
    if model == "linear":
        return float(n)
    if model == "nlogn":
        return float(n) * math.log(max(float(n), 2.0))
    raise ValueError(f"unknown size model {model!r}; choose one of constant, {', '.join(MODELS)}")


@dataclasses.dataclass(frozen=True)
class Fit:
    """A figure as a function of size: ``a + b * g(n)``, fitted on points from ``n_min`` to ``n_max``."""

    model: str
    a: float
    b: float
    rel_err: float  # RMS relative error on the points it was fitted to
    n_min: float
    n_max: float
    unit: str = ""
    source: str = ""

    def at(self, n: float) -> float:
        return self.a + self.b * _g(self.model, n)

    def describe(self, n: float | None = None) -> str:
        form = {"constant": "{a:.4g}", "linear": "{a:.4g} + {b:.4g}*n",
                "nlogn": "{a:.4g} + {b:.4g}*n*ln(n)"}[self.model].format(a=self.a, b=self.b)
        where = f"measured n={self.n_min:,.0f}..{self.n_max:,.0f}"
        if n is not None and n > self.n_max * 1.01:
            where += f", extrapolated {n / self.n_max:,.0f}x"
        return f"{self.unit} = {form} ({self.model}, rms err {self.rel_err:.0%}, {where})"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Fit":
        try:
            fit = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
            _g(fit.model, 1.0)
            return fit
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{where}: not a size fit ({exc})") from None


def _lsq(xs, ys, model: str) -> tuple[float, float, float]:
    """``(a, b, rms relative error)`` minimising the relative error of ``a + b*g(x)``; ``b >= 0``."""
    gs = [_g(model, x) for x in xs]
    w = [1.0 / max(abs(y), 1e-12) for y in ys]
    if model == "constant" or len(set(gs)) < 2:
        a = sum(wi * wi * y for wi, y in zip(w, ys)) / sum(wi * wi for wi in w)
        b = 0.0
    else:  # weighted normal equations for (a, b)
        s00 = sum(wi * wi for wi in w)
        s01 = sum(wi * wi * g for wi, g in zip(w, gs))
        s11 = sum(wi * wi * g * g for wi, g in zip(w, gs))
        t0 = sum(wi * wi * y for wi, y in zip(w, ys))
        t1 = sum(wi * wi * g * y for wi, g, y in zip(w, gs, ys))
        det = s00 * s11 - s01 * s01
        b = (s00 * t1 - s01 * t0) / det
        a = (t0 - s01 * b) / s00
        if b < 0:  # no figure here shrinks with size: a constant fits better than a falling line
            return _lsq(xs, ys, "constant")
    err = math.sqrt(sum(((a + b * g - y) * wi) ** 2 for g, y, wi in zip(gs, ys, w)) / len(ys))
    return a, b, err


def fit_size(xs, ys, *, unit: str = "", source: str = "", models=MODELS) -> Fit:
    """The simplest of constant and ``models`` whose RMS relative error is within 1% of the best one's."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if not xs or len(xs) != len(ys):
        raise ValueError(f"a size fit needs as many sizes as values, at least one; got {len(xs)} and {len(ys)}")
    fits = []
    for model in ("constant", *[m for m in models if m != "constant"]):
        a, b, err = _lsq(xs, ys, model)
        fits.append(Fit("constant" if b == 0.0 else model, a, b, err, min(xs), max(xs), unit, source))
    best = min(f.rel_err for f in fits)
    return next(f for f in fits if f.rel_err <= best + 0.01)


def envelope_fit(xs, ys, *, unit: str = "", source: str = "") -> Fit:
    """The largest of ``ys`` as a constant: for a cost that does not trend with size but steps with
    something the sizes do not control. A routed query searches one shard of the calibrated size
    whatever the memory's size; the leaves it needs for a recall target step with how well each
    memory's k-means cells route (2, 4, 8 and 4 leaves at 250k, 1M, 2.5M and 10M items), and a line
    through such steps runs away when extrapolated (+152% at 10M from the three smaller sizes)."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if not xs or len(xs) != len(ys):
        raise ValueError(f"an envelope needs as many sizes as values, at least one; got {len(xs)} and {len(ys)}")
    top = max(ys)
    err = math.sqrt(sum((top / y - 1) ** 2 for y in ys) / len(ys)) if all(y > 0 for y in ys) else 0.0
    return Fit("constant", top, 0.0, err, min(xs), max(xs), unit, source + " (the costliest measured size)")


@dataclasses.dataclass(frozen=True)
class ModeRates:
    """One storage mode's bytes per item (``per_dim * dim + fixed``) and costs relative to float32."""

    disk_per_dim: float
    disk_fixed: float
    ram_per_dim: float
    ram_fixed: float
    build_factor: float = 1.0
    query_factor: float | None = None  # None: not measured at the target (float32's cost is assumed)
    max_recall: float | None = None    # the highest recall@10 this mode reached when measured
    source: str = ""

    def disk_bytes(self, dim: int) -> float:
        return self.disk_per_dim * dim + self.disk_fixed

    def ram_bytes(self, dim: int) -> float:
        return self.ram_per_dim * dim + self.ram_fixed


@dataclasses.dataclass(frozen=True)
class QueryRates:
    """At one recall target: CPU seconds per query and one-query latency, fitted to memory size."""

    recall: float
    cpu_s: Fit
    latency_s: Fit


@dataclasses.dataclass(frozen=True)
class Calibration:
    path: str
    dim: int
    shard_items: int
    cores: int          # cores of the machine it was measured on
    figures: dict       # name -> Fit (build_cpu_s, build_wall_s, driver_rss, worker_rss, open_s, remove_s, ...)
    query: tuple        # QueryRates, by recall ascending
    storage: dict       # mode -> ModeRates
    dim_exponent: dict  # "build" / "query" -> exponent of (dim / self.dim)
    encoder: dict | None
    about: dict
    routing_flops: float | None = None  # multiply-adds x 2 per CPU-second of routing queries over cells

    def figure(self, name: str) -> Fit:
        if name not in self.figures:
            raise ValueError(f"the calibration {self.path} lacks the figure {name!r}; write a new one with "
                             "vismem plan --calibrate")
        return self.figures[name]

    def mode(self, name: str) -> ModeRates:
        if name not in self.storage:
            if name in EXACT_ONLY_MODES:
                raise ValueError(f"storage mode {name!r} exists for exact (brute-force) memories only, and vismem "
                                 f"plan sizes ScaNN memories (exact search of a billion items is not a plan); choose "
                                 f"one of {', '.join(sorted(self.storage))}")
            raise ValueError(f"the calibration {self.path} has no rates for storage mode {name!r} (it has: "
                             f"{', '.join(sorted(self.storage))}); calibrate where that mode is available")
        return self.storage[name]

    def query_at(self, recall: float) -> QueryRates:
        """The rates of the smallest measured recall target at or above ``recall``."""
        for q in self.query:
            if q.recall >= recall - 1e-9:
                return q
        top = max(q.recall for q in self.query)
        raise ValueError(f"--recall {recall} is above the highest recall the calibration {self.path} measured "
                         f"({top}); plan for at most {top}")

    def dim_factor(self, kind: str, dim: int) -> float:
        return (dim / self.dim) ** float(self.dim_exponent.get(kind, 1.0))

    def dim_note(self, kind: str, dim: int) -> str:
        """How the ``kind`` cost was scaled from the calibration's dimension to ``dim``."""
        e = self.dim_exponent.get(kind)
        how = f"exponent {e:.2f} measured" if e is not None else "assumed linear"
        return f"(dim {dim}/{self.dim})^{1.0 if e is None else e:.2f} = {self.dim_factor(kind, dim):.2f}, {how}"


def _req(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: missing {key!r}")
    return d[key]


def parse_calibration(d: dict, path: str) -> Calibration:
    """A calibration from its JSON object; a malformed one raises ValueError naming what is wrong."""
    where = f"calibration {path}"
    if _req(d, "format", where) != FORMAT:
        raise ValueError(f"{where}: format {d.get('format')!r} is not {FORMAT!r}")
    figures = {k: Fit.from_json(v, f"{where} figure {k}") for k, v in _req(d, "figures", where).items()}
    query = tuple(sorted((QueryRates(float(r), Fit.from_json(_req(v, "cpu_s", where), f"{where} query {r}"),
                                     Fit.from_json(_req(v, "latency_s", where), f"{where} query {r}"))
                          for r, v in _req(d, "query", where).items()), key=lambda q: q.recall))
    if not query:
        raise ValueError(f"{where}: no query rates")
    try:
        storage = {m: ModeRates(**v) for m, v in _req(d, "storage", where).items()}
    except TypeError as exc:
        raise ValueError(f"{where}: a storage mode's rates are malformed ({exc})") from None
    return Calibration(path=path, dim=int(_req(d, "dim", where)), shard_items=int(_req(d, "shard_items", where)),
                       cores=int(_req(d, "cores", where)), figures=figures, query=query, storage=storage,
                       dim_exponent=dict(d.get("dim_exponent") or {}), encoder=d.get("encoder"),
                       about=dict(d.get("about") or {}), routing_flops=_routing_flops(d, where))


def _routing_flops(d: dict, where: str) -> float | None:
    r = (d.get("routing") or {}).get("flops_per_cpu_s")
    if r is not None and (not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0):
        raise ValueError(f"{where}: routing.flops_per_cpu_s must be a number > 0, got {r!r}")
    return None if r is None else float(r)


def load_calibration(path: str) -> Calibration:
    """Read and check a calibration file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not JSON, or not a calibration (what is missing is named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no calibration file at {path} (write one with vismem plan --calibrate)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration {path} is not JSON: {exc}") from None
    return parse_calibration(d, path)


def default_calibration_path() -> str:
    """The calibration measured for this project, shipped beside this module."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.json")


def _fit(points, x: str, y: str, unit: str, source: str, models=MODELS) -> dict:
    pts = [(p[x], p[y]) for p in points if p.get(y) is not None]
    return fit_size([a for a, _ in pts], [b for _, b in pts], unit=unit, source=source, models=models).to_json()


def mode_rates(mode_points: list[dict]) -> tuple[dict, dict]:
    """``({mode: ModeRates fields}, dim exponents)`` from measurements of each mode at two dimensions."""
    by = {}
    for r in mode_points:
        by.setdefault(r["mode"], {})[r["dim"]] = r
    out, exps = {}, {}
    ref = by.get("float32", {})
    for mode, at in by.items():
        if len(at) < 2:
            continue
        d1, d2 = sorted(at)[:2]
        a, b = at[d1], at[d2]
        rates = {}
        for key, name in (("disk_bytes_per_item", "disk"), ("ram_per_item", "ram")):
            per_dim = max((b[key] - a[key]) / (d2 - d1), 0.0)
            rates[f"{name}_per_dim"], rates[f"{name}_fixed"] = per_dim, max(a[key] - per_dim * d1, 0.0)
        if mode == "float32":
            rates["query_factor"] = 1.0
        elif d2 in ref:
            rates["build_factor"] = b["build_cpu_s"] / ref[d2]["build_cpu_s"]
            if b["query"] and ref[d2]["query"]:
                rates["query_factor"] = b["query"]["cpu_s_per_query"] / ref[d2]["query"]["cpu_s_per_query"]
        if all(r.get("max_recall") is not None for r in (a, b)):
            rates["max_recall"] = min(a["max_recall"], b["max_recall"])
        rates["source"] = f"one ScaNN shard of {a['n']:,} items measured at dim {d1} and {d2}"
        out[mode] = rates
    if len(ref) >= 2:
        d1, d2 = sorted(ref)[:2]
        costs = {"build": [ref[d]["build_cpu_s"] for d in (d1, d2)]}
        if ref[d1]["query"] and ref[d2]["query"]:
            costs["query"] = [ref[d]["query"]["cpu_s_per_query"] * 1000 for d in (d1, d2)]  # per 1,000 queries
        for kind, (c1, c2) in costs.items():
            if min(c1, c2) >= MIN_CPU_S:  # below that, timer noise would set the exponent
                exps[kind] = min(max(math.log(c2 / c1) / math.log(d2 / d1), 0.0), 2.0)
    return out, exps


def calibration_from(points: list[dict], mode_points: list[dict], *, dim: int, shard_items: int, cores: int,
                     about: dict, routing: dict | None = None) -> dict:
    """A calibration (JSON object) from ladder points (``deploy.ladder.measure_point``) and storage modes.

    The size figures are fitted on the points at ``shard_items`` per shard; the worker RSS on every
    point against its largest shard (the ladder adds one point with larger shards for that slope).
    """
    main = [p for p in points if p["shard_items"] == shard_items]
    src = f"ladder of {len(main)} sizes, {shard_items:,} items per shard, dim {dim}"
    figures = {
        "build_cpu_s": _fit(main, "n", "build_cpu_s", "build CPU s", src),
        "build_wall_s": _fit(main, "n", "build_wall_s", f"build wall s on {cores} workers", src),
        "driver_rss": _fit(main, "n", "driver_rss", "driver RSS B", src),
        "worker_rss": _fit(points, "shard_items_max", "worker_rss", "worker RSS B (n = shard items)",
                           f"{len(points)} builds, largest worker against largest shard", models=("linear",)),
        "bytes_per_item": _fit(main, "n", "bytes_per_item", "B/item on disk", src),
        "input_bytes_per_item": _fit(main, "n", "input_bytes_per_item", "embedding shard B/item", src),
        "serve_ram_per_item": _fit(main, "n", "serve_ram_per_item", "RAM B/item once open", src),
        "serve_ram": _fit(main, "n", "serve_ram_bytes", "RAM B once open", src, models=("linear",)),
        "serve_base_rss": _fit(main, "n", "serve_base_rss", "serving process RSS before opening, B", src,
                               models=("constant",)),
        "open_s": _fit(main, "n", "open_s", "open s", src),
        "remove_s": _fit(main, "n", "remove_s", "remove 0.1% s", src),
    }
    query = {}
    for target in sorted({t for p in main for t in p["query"]}, key=float):
        pts = [{"n": p["n"], **p["query"][target]} for p in main if target in p["query"]]
        if len(pts) >= 2:
            cpu = envelope_fit([p["n"] for p in pts], [p["cpu_s_per_query"] for p in pts], unit="CPU s/query",
                               source=src)
            query[target] = {"cpu_s": cpu.to_json(),
                             "latency_s": _fit(pts, "n", "latency_s", "one query alone, s", src,
                                               models=("constant",))}
    storage, exps = mode_rates(mode_points)
    return {"format": FORMAT, "dim": dim, "shard_items": shard_items, "cores": cores, "about": about,
            "figures": figures, "query": query, "storage": storage, "dim_exponent": exps, "encoder": None,
            "routing": routing,
            "ladder": points, "modes": mode_points}
