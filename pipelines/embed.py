"""``vismem embed``: image collections to embedding shards on Ray, with optional pseudo-labelling.

The driver checks everything at the door, then Ray runs :mod:`pipelines.embed_worker`: CPU tasks
decode input shards, a pool of encoder actors (each loads its encoder and teacher once; one GPU each
when the cluster has GPUs) embeds and labels them and writes one output per input shard; the driver
keeps a bounded window of shards in flight (backpressure) and draws the progress bar. An actor lost
with its node is replaced and its shard done again elsewhere (:mod:`pipelines.embed_pool`); each shard
is written whole under its final name, so every row is there exactly once. Work is resumable per
input shard (see :mod:`pipelines.outputs`).

Example::

    summary = run_embed(EmbedConfig(SourceSpec("fashion-mnist", limit=2000), "out/fmnist",
                                    encoder="efficientnet-lite0", image_size=64))
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import time

from memory import storage
from pipelines import outputs
from pipelines.embed_pool import EmbedPool
from pipelines.embed_summary import EncodeRun, build_summary
from pipelines.embed_worker import EncoderWorker, Progress, decode_shard
from pipelines.images import DEFAULT_MAX_PIXELS
from pipelines.progress import SILENT
from pipelines.sources import Source, SourceSpec, open_source

log = logging.getLogger("vismem.embed")
# Settings the workers need to see as the driver does (storage endpoints, credentials, model folders):
# forwarded to the job's workers when this process starts Ray or connects to a cluster.
FORWARDED_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_APPLICATION_CREDENTIALS",
                 "VISMEM_MODEL_DIR", "HF_HUB_OFFLINE")


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Everything a run needs. Fields that change the output form the run's identity (``run.json``)."""

    source: SourceSpec
    out: str
    encoder: str = "efficientnet-lite0"
    image_size: int | None = None
    batch_size: int = 64
    dtype: str = "float32"
    teacher: str | None = None
    label_map: str | None = None
    min_confidence: float = 0.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    ray_address: str | None = None
    num_workers: int | None = None
    threads_per_worker: int | None = None
    device: str = "auto"
    progress: bool = True


def run_embed(cfg: EmbedConfig, progress=SILENT) -> dict:
    """Embed (and pseudo-label) a source into ``cfg.out``; skip input shards already complete.

    ``progress`` (``pipelines.progress``) draws the stages: starting Ray and the encoders, embedding
    (bars only with ``cfg.progress``).

    Returns:
        The run summary (also written to ``OUT/summary.json``).

    Raises:
        FileNotFoundError: the source, a weights folder, a probe or a label map does not exist.
        ValueError: bad options, or ``OUT`` holds a different run.
    """
    t_start = time.perf_counter()
    source, image_size, teacher, label_map, identity = resolve(cfg)
    layout = outputs.OutputLayout(cfg.out)
    layout.check_run(identity)
    layout.clean_temporaries()
    shards = source.shards()
    done_before = layout.completed()
    todo = [s for s in shards if s.name not in done_before]
    stale = sorted(set(done_before) - {s.name for s in shards})
    if stale:
        raise ValueError(f"{cfg.out} holds shards this source does not produce ({', '.join(stale[:3])}...)")
    images = sum(s.size or 0 for s in todo)
    log.info("embedding %s into %s: %d input shards, %d to do, %d complete before; identity %s", cfg.source.uri,
             cfg.out, len(shards), len(todo), len(done_before), identity)
    progress.note(f"source: {source.spec.uri} ({source.spec.kind}), {len(shards)} input shard"
                  f"{'s' * (len(shards) != 1)}, {len(todo)} to do" + (f" ({images:,} images)" if images else "")
                  + f" -> {cfg.out}")
    run = _encode_on_ray(cfg, source, image_size, label_map, todo, progress) if todo else EncodeRun()
    summary = build_summary(cfg, source, identity, teacher, label_map, shards, done_before, run,
                            time.perf_counter() - t_start)
    layout.write_summary(summary)
    return summary


def resolve(cfg: EmbedConfig):
    """Check everything at the door (before Ray starts): source, encoder size, teacher, label map.

    Returns:
        ``(source, image size, teacher or None, label map or None, the run's identity)``.
    """
    # Imported here: they import torch, which importing this module should not cost.
    from pipelines.encoders import encoder_image_size
    from pipelines.teachers import load_teacher, resolve_label_map

    _check(cfg)
    source = open_source(cfg.source)
    image_size = encoder_image_size(cfg.encoder, cfg.image_size)
    teacher = load_teacher(cfg.teacher) if cfg.teacher else None
    label_map = resolve_label_map(teacher, cfg.label_map) if teacher else None
    return source, image_size, teacher, label_map, _identity(cfg, source, image_size, teacher is not None)


def _check(cfg: EmbedConfig) -> None:
    if cfg.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {cfg.batch_size}")
    if cfg.dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {cfg.dtype!r}")
    if not 0.0 <= cfg.min_confidence <= 1.0:
        raise ValueError(f"min confidence must be in [0, 1], got {cfg.min_confidence}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.label_map and not cfg.teacher:
        raise ValueError("--label-map maps a teacher's classes: pass --teacher too")


def _identity(cfg: EmbedConfig, source: Source, image_size: int, has_teacher: bool) -> dict:
    """The fields that change the output (``run.json``); a re-run into the same OUT must match them."""
    spec = source.spec
    return {
        "source": spec.uri, "source_kind": spec.kind, "source_name": spec.name,
        "split": spec.split if spec.kind == "idx" else None, "shard_size": spec.shard_size,
        "limit": spec.limit, "unlabelled_fraction": spec.unlabelled_fraction,
        "image_column": spec.image_column if spec.kind == "parquet" else None,
        "label_column": spec.label_column if spec.kind == "parquet" else None,
        "encoder": cfg.encoder, "image_size": image_size, "dtype": cfg.dtype, "max_pixels": cfg.max_pixels,
        "teacher": cfg.teacher,
        "label_map_sha256": hashlib.sha256(storage.read_bytes(cfg.label_map)).hexdigest() if cfg.label_map else None,
        "min_confidence": cfg.min_confidence if has_teacher else None,
    }


@dataclasses.dataclass(frozen=True)
class _Placement:
    """How the run sits on the cluster: device, actor count, threads and CPU share per actor."""

    device: str
    workers: int
    threads: int
    actor_cpus: float
    cpus: float
    gpus: int

    @classmethod
    def of(cls, cfg: EmbedConfig, resources: dict) -> "_Placement":
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
        if device == "cuda" and not gpus:
            raise ValueError("--device cuda but the Ray cluster has no GPU")
        workers = cfg.num_workers or (gpus if device == "cuda" else max(1, int(cpus) // 4))
        if workers < 1:
            raise ValueError(f"num workers must be >= 1, got {workers}")
        threads = cfg.threads_per_worker or max(1, int(cpus) // workers)
        # Leave one CPU slot for decoding tasks, or they could never be scheduled.
        actor_cpus = 1.0 if cpus - workers >= 1 else max(0.0, (cpus - 1) / workers)
        return cls(device, workers, threads, actor_cpus, cpus, gpus)

    def ray_info(self, address: str | None) -> dict:
        return {"address": address or "local", "workers": self.workers, "threads_per_worker": self.threads,
                "device": self.device, "cluster_cpus": self.cpus, "cluster_gpus": self.gpus}


def _encode_on_ray(cfg: EmbedConfig, source: Source, image_size: int, label_map, todo: list,
                   progress=SILENT) -> EncodeRun:
    """Start (or join) Ray, run the shards in ``todo`` through a pool of encoder actors, stop Ray if started."""
    import ray

    # Ray prints cluster events (a node marked dead, a task retried) to the driver's stdout, which carries
    # vismem's JSON summary: while Ray is connected, stdout goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        starting = progress.stage("start Ray and encoders", unit="workers", rate=False)
        started = _init_ray(cfg.ray_address)
        try:
            return _encode(cfg, source, image_size, label_map, todo, starting, progress)
        finally:
            starting.close()
            if started:
                ray.shutdown()


def _encode(cfg: EmbedConfig, source: Source, image_size: int, label_map, todo: list, starting=None,
            progress=SILENT) -> EncodeRun:
    """The encoding stage on the connected cluster: actors placed, shards fed, lost actors replaced."""
    import ray

    starting = starting or SILENT.stage("start")

    place = _Placement.of(cfg, ray.cluster_resources())
    # No Ray restarts: the pool replaces a lost actor itself (see pipelines.embed_pool).
    opts = dict(num_cpus=place.actor_cpus, max_restarts=0, max_task_retries=0)
    if place.device == "cuda":
        opts["num_gpus"] = 1
    worker_cls = ray.remote(EncoderWorker).options(**opts)
    args = (cfg.encoder, image_size, cfg.teacher, label_map.mapping if label_map else None, cfg.min_confidence,
            cfg.batch_size, cfg.dtype, place.threads, place.device, cfg.out, source.spec.name,
            tuple(source.class_names or ()))
    # Decoding reserves no CPU: after a node loss the surviving CPUs may all be held by encoder actors,
    # and a decode task that waited for one would stall the run. At most one shard per actor decodes ahead.
    decode = ray.remote(num_cpus=0, max_retries=3)(decode_shard)
    source_ref = ray.put(source)  # once: a folder source carries its whole file listing
    feeder = _Feeder(decode, source_ref, image_size, cfg.max_pixels)
    feeder.prefetch(todo[:2 * place.workers])  # the first shards decode while the actors load their models
    pool = EmbedPool(lambda: worker_cls.remote(*args), place.workers)
    workers_info = pool.wait_ready()
    log.info("encoder workers ready: %s; placement %s", workers_info, place)
    starting.update(len(workers_info))
    starting.close()
    t_encode = time.perf_counter()
    stats = feeder.run(pool, todo, progress if cfg.progress else SILENT)
    return EncodeRun(stats, workers_info, {**place.ray_info(cfg.ray_address), "actors_lost": pool.lost},
                     time.perf_counter() - t_encode)


def _init_ray(address: str | None) -> bool:
    """Start a local Ray instance or connect to ``address``; ``False`` when Ray was already initialised
    (the caller's job and its environment are used as they are)."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                  runtime_env={"env_vars": env} if env else None)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a fresh instance, never an unrelated cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
    return True


class _Feeder:
    """Feeds shards to the actor pool, the next ones decoding while the actors embed (one per actor ahead);
    a progress bar tracks images/s and the time left."""

    def __init__(self, decode, source_ref, image_size: int, max_pixels: int):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.decode, self.source_ref = decode, source_ref
        self.image_size, self.max_pixels = image_size, max_pixels
        self.decoding: dict = {}  # shard name -> decode task started ahead of its turn
        # The counter lives on the driver's node (a lost worker node must not take it, and the run, down)
        # and restarts if it is lost anyway: it only draws the bar, so a count that starts over is harmless.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.progress = ray.remote(Progress).options(num_cpus=0, max_restarts=-1,
                                                     scheduling_strategy=here).remote()

    def prefetch(self, shards: list) -> None:
        """Start decoding ``shards`` (those not decoding yet) ahead of their turn."""
        for s in shards:
            if s.name not in self.decoding:
                self.decoding[s.name] = self._decode(s)

    def _decode(self, shard):
        return self.decode.remote(self.source_ref, shard, self.image_size, self.max_pixels)

    def run(self, pool: EmbedPool, todo: list, progress=SILENT) -> list[dict]:
        """Every shard of ``todo`` through ``pool``; the stats each returned, in completion order."""
        sizes = [s.size for s in todo]
        total = None if any(s is None for s in sizes) else sum(sizes)
        bar = progress.stage("embed", total=total, unit="img")
        try:
            stats = pool.run(todo, self._submit, self.prefetch, lambda: self._refresh(bar, total),
                             key=lambda shard: f"input shard {shard.name}")
            self._refresh(bar, total)
            return stats
        finally:
            bar.close()

    def _submit(self, actor, shard):
        # A shard queued again after its actor was lost is decoded again: its first decoding went with the call.
        decoded = self.decoding.pop(shard.name) if shard.name in self.decoding else self._decode(shard)
        return actor.process.remote(shard, decoded, self.progress)

    def _refresh(self, bar, total: int | None) -> None:
        import ray

        try:
            done = ray.get(self.progress.get.remote())  # a retried shard counts twice: never run past the total
        except ray.exceptions.RayActorError:
            return  # the counter is being restarted after a node loss: the bar waits, the run does not
        now = min(done, total) if total else done
        if now > bar.n:
            bar.update(now - bar.n)
