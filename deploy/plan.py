"""Sizing a memory from measured rates (``vismem plan``): units, the request, the plan and its table.

Pure: every figure follows from the request and a :class:`~deploy.rates.Calibration` (the only I/O,
reading it, lives in ``deploy.rates``). Each row of a plan names the measured rate it came from and
says when it is extrapolated beyond the sizes measured.

The model, per item of dimension ``D`` in storage mode ``M`` (``D0``: the calibration's dimension):

- shard size: the largest whose build fits a worker's share of RAM (one worker per core), by the
  measured worker RSS ``a + b * shard_items`` scaled by ``D / D0``, at most ``MAX_SHARD_ITEMS``;
- bytes: the mode's measured ``per_dim * D + fixed``, on disk and in RAM once open;
- serving machines: enough for the RAM (``USABLE_RAM`` of each machine) and for the queries/s
  (CPU seconds per query at the recall target, fitted to size, times the dimension and mode factors);
- build: CPU core-seconds fitted to size, on ``min(workers, shards)`` workers, plus the fixed part;
- embedding: images / (images/s per GPU).
"""
from __future__ import annotations

import dataclasses
import math
import re

from deploy.rates import Calibration
from memory.partition import BLOCK_SIMILARITIES, default_cells, default_sample

MAX_SHARD_ITEMS = 1_000_000  # larger shards only make a retry, a rebuild and a probe slower
USABLE_RAM = 0.75            # of a machine's RAM, for shards; the rest for queries, the OS and headroom
WORKER_RAM = 0.8             # of a worker's share of RAM that a shard build may use
MAX_ITEMS = 1e13             # beyond any memory we could plan from these rates: a typo, not a plan
MAX_DIM = 65_536

_COUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*([kmbt]?)\s*$", re.I)
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_BYTES = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.I)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_count(text, what: str = "--items") -> int:
    """``1e9``, ``10M``, ``2.5k``, ``1_000_000`` or ``1000000`` -> an integer count >= 1.

    Raises:
        ValueError: not a number, negative or zero, not a whole count, or absurdly large.
    """
    s = str(text).replace("_", "").replace(",", "")
    m = _COUNT.match(s)
    if not m:
        if s.strip().startswith("-"):
            raise ValueError(f"{what} must be positive, got {text!r}")
        raise ValueError(f"{what} must be a count such as 1e9, 10M or 250k, got {text!r}")
    value = float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{what} must be at least 1, got {text!r}")
    if value != round(value):
        raise ValueError(f"{what} must be a whole number, got {text!r}")
    if value > MAX_ITEMS:
        raise ValueError(f"{what} {text!r} is beyond {MAX_ITEMS:.0e}: check the exponent")
    return int(round(value))


def parse_bytes(text, what: str = "ram") -> int:
    """``64GB`` (10^9), ``512GiB`` (2^30), ``1.5T``, ``4096`` -> bytes.

    Raises:
        ValueError: not a size, or not positive.
    """
    m = _BYTES.match(str(text))
    if not m:
        raise ValueError(f"{what} must be a size such as 64GB or 512GiB, got {text!r}")
    base = 1024 if m.group(3) else 1000
    value = float(m.group(1)) * base ** _POWERS[m.group(2).lower()]
    if not value > 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Machine:
    cores: int
    ram_bytes: int


def parse_machine(text: str) -> Machine:
    """``cores=16,ram=64GB`` (either order) -> a Machine.

    Raises:
        ValueError: a missing or unknown key, or a bad value; the message shows the expected form.
    """
    form = "expected --machine cores=N,ram=SIZE (e.g. cores=16,ram=64GB)"
    fields = {}
    for part in str(text).split(","):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("cores", "ram") or key in fields:
            raise ValueError(f"--machine {text!r}: bad or repeated part {part.strip()!r}; {form}")
        fields[key] = value.strip()
    if set(fields) != {"cores", "ram"}:
        raise ValueError(f"--machine {text!r}: missing {' and '.join(sorted({'cores', 'ram'} - set(fields)))}; {form}")
    if not fields["cores"].isdigit() or int(fields["cores"]) < 1:
        raise ValueError(f"--machine {text!r}: cores must be a whole number >= 1; {form}")
    return Machine(int(fields["cores"]), parse_bytes(fields["ram"], "--machine ram"))


@dataclasses.dataclass(frozen=True)
class Request:
    items: int
    dim: int
    storage: str
    recall: float
    qps: float
    machine: Machine
    build_workers: int | None = None  # default: the serving machines' cores
    gpus: int | None = None
    encoder_rate: float | None = None  # images/s per GPU
    shard_items: int | None = None     # default: the largest that fits a build worker

    def __post_init__(self):
        if not 1 <= self.dim <= MAX_DIM:
            raise ValueError(f"--dim must be between 1 and {MAX_DIM}, got {self.dim}")
        if not 0 < self.recall <= 1:
            raise ValueError(f"--recall must be in (0, 1], got {self.recall}")
        if not (math.isfinite(self.qps) and self.qps > 0):
            raise ValueError(f"--qps must be a positive number, got {self.qps}")
        for name in ("build_workers", "gpus", "shard_items"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.encoder_rate is not None and not (math.isfinite(self.encoder_rate) and self.encoder_rate > 0):
            raise ValueError(f"--encoder-rate must be a positive images/s, got {self.encoder_rate}")


@dataclasses.dataclass(frozen=True)
class Row:
    figure: str
    value: float
    unit: str
    text: str    # the value as a person reads it
    source: str  # the measured rate it came from


@dataclasses.dataclass(frozen=True)
class Plan:
    request: Request
    rows: tuple

    def value(self, figure: str) -> float:
        return next(r.value for r in self.rows if r.figure == figure)

    def to_json(self) -> dict:
        return {"request": {**dataclasses.asdict(self.request)},
                "rows": [dataclasses.asdict(r) for r in self.rows]}


def human_bytes(n: float) -> str:
    for unit, p in (("PB", 5), ("TB", 4), ("GB", 3), ("MB", 2), ("kB", 1)):
        if n >= 1000 ** p:
            return f"{n / 1000 ** p:,.1f} {unit}"
    return f"{n:,.0f} B"


def human_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:,.1f} h"
    return f"{s / 60:,.1f} min" if s >= 60 else f"{s:,.2f} s"


def shard_size(req: Request, cal: Calibration) -> tuple[int, int, str]:
    """``(shards, items per shard, why)``: the largest shard whose build fits a worker's RAM share."""
    rss = cal.figure("worker_rss")
    per_worker = req.machine.ram_bytes / req.machine.cores
    scale = req.dim / cal.dim
    room = WORKER_RAM * per_worker - rss.a
    # A constant fit: the calibration's shards were too small to show a per-item cost; only the cap applies.
    fits = MAX_SHARD_ITEMS if rss.b <= 0 and room > 0 else int(room / max(rss.b * scale, 1e-9))
    if fits < 1000:
        raise ValueError(f"a shard build needs more RAM per core than {human_bytes(per_worker)} "
                         f"({human_bytes(rss.a)} fixed per worker); give a machine with more RAM per core")
    size = min(fits, MAX_SHARD_ITEMS) if req.shard_items is None else req.shard_items
    if size > fits:
        raise ValueError(f"--shard-items {size:,} needs {human_bytes(rss.a + rss.b * scale * size)} per build worker; "
                         f"{human_bytes(per_worker)} per core allows at most {fits:,}")
    shards = max(1, math.ceil(req.items / size))
    size = math.ceil(req.items / shards)
    why = (f"{rss.describe(size)} x {scale:.2f} (dim {req.dim}/{cal.dim}) <= {WORKER_RAM:.0%} of "
           f"{human_bytes(per_worker)} per core; cap {MAX_SHARD_ITEMS:,}")
    return shards, size, why


def _router_size(shards: int) -> tuple[int, int]:
    """``(sampled rows, k-means cells)`` a build of ``shards`` shards trains its router with by default."""
    sample = default_sample(shards)
    return sample, default_cells(shards, sample)


def _serving(req: Request, cal: Calibration, shards: int, rows: list) -> tuple[int, float]:
    """Rows for bytes, RAM, machines and queries; returns ``(machines, CPU seconds per query)``."""
    mode, n, d = cal.mode(req.storage), req.items, req.dim
    disk = mode.disk_bytes(d) * n
    ram = mode.ram_bytes(d) * n
    src = f"{req.storage}: {mode.source}" if mode.source else req.storage
    rows.append(Row("disk_bytes", disk, "B", f"{human_bytes(disk)} ({mode.disk_bytes(d):,.0f} B/item)",
                    f"disk B/item = {mode.disk_per_dim:.3g}*dim + {mode.disk_fixed:.3g} ({src})"))
    inputs = cal.figure("input_bytes_per_item")
    in_bytes = (inputs.at(n) - 4 * cal.dim + 4 * d) * n  # float32 embedding shards: 4 bytes per dimension
    rows.append(Row("gcs_bytes", disk + in_bytes, "B", f"{human_bytes(disk + in_bytes)} (memory {human_bytes(disk)}"
                    f" + embedding shards {human_bytes(in_bytes)})",
                    f"embedding shards: {inputs.at(n):,.0f} B/item at dim {cal.dim} measured, +4 B per extra dim"))
    q = cal.query_at(req.recall)
    if mode.max_recall is not None and req.recall > mode.max_recall + 1e-9:
        raise ValueError(f"storage mode {req.storage} reached recall@10 {mode.max_recall:.3f} at most when calibrated "
                         f"({mode.source}); it cannot serve --recall {req.recall}")
    q_mode = 1.0 if mode.query_factor is None else mode.query_factor
    f_q = cal.dim_factor("query", d) * q_mode
    _, cells = _router_size(shards)
    # Routing scores every query against every k-means cell: 2 x cells x dim flops, at the measured rate
    # (part of it is in the measured query cost too: counted twice, on the safe side).
    route_q = 2.0 * cells * d / cal.routing_flops if cal.routing_flops else 0.0
    cpu_q = q.cpu_s.at(n) * f_q + route_q
    usable = USABLE_RAM * req.machine.ram_bytes - cal.figure("serve_base_rss").at(n)
    if usable <= 0:
        raise ValueError(f"--machine ram {human_bytes(req.machine.ram_bytes)} leaves nothing for shards after the "
                         "serving process itself")
    by_ram = math.ceil(ram / usable)
    per_machine = req.machine.cores / cpu_q
    by_qps = math.ceil(req.qps / per_machine)
    machines = max(by_ram, by_qps, 1)
    rows.append(Row("serving_machines", machines, "machines",
                    f"{machines:,} (RAM needs {by_ram:,}, {req.qps:,.0f} q/s needs {by_qps:,})",
                    f"RAM per item {mode.ram_bytes(d):,.0f} B = {mode.ram_per_dim:.3g}*dim + {mode.ram_fixed:.3g}; "
                    f"{USABLE_RAM:.0%} of each machine's RAM for shards"))
    rows.append(Row("ram_per_machine", ram / machines, "B", f"{human_bytes(ram / machines)} of "
                    f"{human_bytes(req.machine.ram_bytes)}", f"{human_bytes(ram)} in all over {machines:,} machines"))
    rows.append(Row("query_capacity", machines * per_machine, "q/s",
                    f"{machines * per_machine:,.0f} q/s at recall@10 >= {q.recall}",
                    f"{q.cpu_s.describe(n)}; x {cal.dim_note('query', d)}; x mode "
                    f"{q_mode:.2f}{' (not measured: as float32)' if mode.query_factor is None else ''}"
                    + (f" + routing over {cells:,} cells: 2 x cells x dim at {cal.routing_flops / 1e9:,.1f} GFLOP per "
                       f"CPU-second (measured) = {route_q * 1e3:.3g} ms" if cal.routing_flops else
                       " (routing over the cells not measured by this calibration)")
                    + f"; {cpu_q * 1e3:.3g} ms in all"))
    # One query alone: the per-call cost measured on the ladder (its mean), plus the work the planned
    # memory adds per query beyond the largest one measured (routing over more cells, larger probes).
    extra = max(cpu_q - q.cpu_s.at(q.cpu_s.n_max), 0.0)
    lat = q.latency_s.at(n) + extra
    rows.append(Row("latency", lat, "s", f"{lat * 1e3:,.1f} ms per query",
                    f"{q.latency_s.describe()} + {extra * 1e3:,.1f} ms of extra CPU per query over the largest "
                    f"memory measured; the network and a fan-out across machines add to it"))
    return machines, cpu_q


def _build(req: Request, cal: Calibration, shards: int, machines: int, rows: list) -> None:
    mode, n = cal.mode(req.storage), req.items
    f_b = cal.dim_factor("build", req.dim) * mode.build_factor
    cpu = cal.figure("build_cpu_s")
    core_s = max(cpu.at(n), 0.0) * f_b
    workers = req.build_workers or machines * req.machine.cores
    used = min(workers, shards)
    fixed = cal.figure("build_wall_s").a
    wall = fixed + core_s / used
    rows.append(Row("build_core_hours", core_s / 3600, "core-h", f"{core_s / 3600:,.1f} core-hours",
                    f"{cpu.describe(n)}; x {cal.dim_note('build', req.dim)}; x mode {mode.build_factor:.2f}"))
    rows.append(Row("build_wall_hours", wall / 3600, "h", f"{human_seconds(wall)} on {used:,} workers"
                    f"{f' (of {workers:,}: one shard per worker at most)' if used < workers else ''}",
                    f"core-seconds / workers + {fixed:,.0f} s fixed (intercept of the measured build wall time)"))
    # The build's driver holds paths only (staged pieces, sample files), not rows: what grows with the
    # items is their number (one piece per input file and shard), which the runner groups by shard.
    drv = cal.figure("driver_rss")
    rows.append(Row("build_driver_ram", drv.at(n), "B", human_bytes(drv.at(n)),
                    drv.describe(n) + "; the driver holds the staged files' paths, not their rows"))
    # The k-means step is the one task that does not scale with a shard: one worker trains the router on
    # the whole sample, held once as float32, with a block of similarities
    # (memory.partition.BLOCK_SIMILARITIES), on top of a worker's fixed RSS.
    sample, cells = _router_size(shards)
    km = cal.figure("worker_rss").a + 4 * sample * req.dim + 4 * BLOCK_SIMILARITIES
    rows.append(Row("kmeans_worker_ram", km, "B",
                    f"{human_bytes(km)} on one worker ({sample:,} sampled rows, {cells:,} cells)",
                    f"worker fixed {human_bytes(cal.figure('worker_rss').a)} + 4 B x rows x dim + a "
                    f"{human_bytes(4 * BLOCK_SIMILARITIES)} block of similarities (the trainer's arrays; "
                    f"benchmarks/kmeans_step.py measures them)"))


def _embedding(req: Request, cal: Calibration, rows: list) -> None:
    enc = cal.encoder or {}
    rate, src = req.encoder_rate, "--encoder-rate"
    if rate is None and enc.get("images_per_s"):
        rate, src = float(enc["images_per_s"]), f"measured: {enc.get('name', 'encoder')} on {enc.get('device', '?')}"
    if rate is None:
        if req.gpus:
            raise ValueError("--gpus needs an encoder rate: give --encoder-rate IMAGES_PER_S (per GPU); the "
                             f"calibration {cal.path} measured none")
        rows.append(Row("embedding_gpu_hours", float("nan"), "GPU-h", "not planned",
                        "give --encoder-rate IMAGES_PER_S (per GPU) to plan the embedding"))
        return
    hours = req.items / rate / 3600
    gpus = req.gpus or 1
    rows.append(Row("embedding_gpu_hours", hours, "GPU-h", f"{hours:,.1f} GPU-hours ({hours / gpus:,.1f} h on "
                    f"{gpus} GPU{'s' if gpus > 1 else ''})", f"{rate:,.0f} images/s per GPU ({src})"))


def make_plan(req: Request, cal: Calibration) -> Plan:
    """The plan of ``req`` from the rates of ``cal``; every row names its source.

    Raises:
        ValueError: a storage mode or recall the calibration lacks, or a machine too small.
    """
    cal.mode(req.storage)  # the mode first: the most likely gap in a calibration
    rows: list[Row] = []
    shards, size, why = shard_size(req, cal)
    rows.append(Row("shards", shards, "shards", f"{shards:,} shards of {size:,} items", why))
    machines, _ = _serving(req, cal, shards, rows)
    _build(req, cal, shards, machines, rows)
    _embedding(req, cal, rows)
    per_machine = req.items / machines
    op = cal.figure("open_s")
    rows.append(Row("open_seconds", op.at(per_machine), "s", f"{human_seconds(op.at(per_machine))} per machine "
                    f"({per_machine:,.0f} items)", op.describe(per_machine)))
    rm = cal.figure("remove_s")
    rows.append(Row("remove_seconds", rm.at(req.items), "s", f"{human_seconds(rm.at(req.items))} to remove 0.1%",
                    rm.describe(req.items)))
    return Plan(req, tuple(rows))


def format_table(plan: Plan, cal: Calibration) -> str:
    """The plan as a Markdown table, headed by the request and the calibration it used."""
    r = plan.request
    head = (f"plan: {r.items:,} items x {r.dim}-d, storage {r.storage}, recall@10 >= {r.recall}, {r.qps:,.0f} q/s, "
            f"machines of {r.machine.cores} cores / {human_bytes(r.machine.ram_bytes)}\n"
            f"calibration: {cal.path} (measured at dim {cal.dim} on {cal.cores} cores"
            f"{', ' + cal.about['measured_at'] if cal.about.get('measured_at') else ''})\n")
    lines = ["| figure | value | from (measured rate) |", "| --- | --- | --- |"]
    lines += [f"| {row.figure} | {row.text} | {row.source} |" for row in plan.rows]
    return head + "\n" + "\n".join(lines)
