"""``vismem embed``: image collections to embedding shards on Ray, with optional pseudo-labelling.

The pure core (:func:`decode_shard`, :class:`ShardProcessor`) works on numpy arrays and is tested
without Ray. Ray only runs it: CPU tasks decode input shards, a pool of encoder actors (each loads
its encoder and teacher once; one GPU each when the cluster has GPUs) embeds and labels them and
writes one output per input shard; the driver keeps a bounded window of shards in flight
(backpressure) and draws the progress bar. Work is resumable per input shard (see
:mod:`pipelines.outputs`).

Example::

    from pipelines.embed import EmbedConfig, run_embed
    from pipelines.sources import SourceSpec
    summary = run_embed(EmbedConfig(SourceSpec("fashion-mnist", limit=2000), "out/fmnist",
                                    encoder="efficientnet-lite0", image_size=64))
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time

import numpy as np

from memory import schema, storage
from pipelines import outputs
from pipelines.images import DEFAULT_MAX_PIXELS, BadImage, pixels_of
from pipelines.sources import InputShard, Source, SourceSpec, open_source

log = logging.getLogger(__name__)

COUNT_KEYS = ("read", "quarantined", "embedded", "human_labelled", "unlabelled", "pseudo_labelled",
              "excluded_no_correspondence", "below_confidence", "hidden_labels", "pseudo_evaluated",
              "pseudo_correct")

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


# ----------------------------------------------------------------------------------------------------
# Pure core
# ----------------------------------------------------------------------------------------------------

def decode_shard(source: Source, shard: InputShard, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Read and decode one input shard: pixels of the good records, reasons for the bad ones.

    Returns:
        ``ids``, ``uris`` (object arrays), ``labels``, ``true_labels`` (int32, -1 unknown), ``images``
        (uint8, ``(N, H, W)`` or ``(N, H, W, 3)``), ``errors`` (list of ``(id, uri, reason)``), ``read``.
    """
    ids, uris, labels, truth, pixels, errors = [], [], [], [], [], []
    read = 0
    for rec in source.read(shard):
        read += 1
        try:
            px = pixels_of(rec.payload, image_size, max_pixels)
        except BadImage as exc:
            errors.append((rec.id, rec.uri, str(exc)))
            continue
        ids.append(rec.id)
        uris.append(rec.uri)
        labels.append(rec.label)
        truth.append(rec.true_label)
        pixels.append(px)
    images = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
    return {
        "ids": np.asarray(ids, dtype=object), "uris": np.asarray(uris, dtype=object),
        "labels": np.asarray(labels, dtype=np.int32), "true_labels": np.asarray(truth, dtype=np.int32),
        "images": images, "errors": errors, "read": read,
    }


class ShardProcessor:
    """Embeds a decoded shard batch by batch, pseudo-labels its unlabelled rows, builds the output table.

    Args:
        encoder: a loaded :class:`pipelines.encoders.Encoder`.
        teacher: a :class:`pipelines.teachers.Teacher` (already bound to ``encoder``) or ``None``.
        label_map: teacher class to memory class (:class:`pipelines.teachers.LabelMap`), with a teacher.
        min_confidence: pseudo-labels below this teacher probability are dropped (and counted).
    """

    def __init__(self, encoder, teacher=None, label_map=None, *, min_confidence: float = 0.0,
                 batch_size: int = 64, dtype: str = "float32", source_name: str = ""):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if teacher is not None and label_map is None:
            raise ValueError("a teacher needs a label map")
        self.encoder, self.teacher, self.label_map = encoder, teacher, label_map
        self.min_confidence = float(min_confidence)
        self.batch_size, self.dtype, self.source_name = batch_size, dtype, source_name

    def embed(self, images: np.ndarray, unlabelled: np.ndarray, on_batch=None):
        """``(embeddings, teacher classes, teacher confidences)``; the teacher only sees ``unlabelled`` rows."""
        import torch

        n = len(images)
        emb = np.empty((n, self.encoder.dim), np.float32)
        t_cls = np.full(n, -1, np.int64)
        t_conf = np.zeros(n, np.float32)
        for a in range(0, n, self.batch_size):
            b = min(n, a + self.batch_size)
            emb[a:b], feats = self.encoder.embed_with_features(images[a:b])
            rows = np.flatnonzero(unlabelled[a:b])
            if self.teacher is not None and len(rows):
                c, p = self.teacher.classify(images[a:b][rows], feats[torch.as_tensor(rows)])
                t_cls[a + rows], t_conf[a + rows] = c, p
            if on_batch is not None:
                on_batch(b - a)
        return emb, t_cls, t_conf

    def process(self, shard_name: str, decoded: dict, metadata: dict, on_batch=None):
        """``(table, errors, stats)`` for one decoded shard; ``errors`` rows match ``outputs.ERRORS_SCHEMA``."""
        t0 = time.perf_counter()
        labels = decoded["labels"]
        truth = decoded["true_labels"]
        unlabelled = labels < 0
        emb, t_cls, t_conf = self.embed(decoded["images"], unlabelled, on_batch)
        n = len(labels)
        out_labels = labels.astype(np.int32).copy()
        label_source = np.full(n, "human", dtype=object)
        confidence = np.ones(n, np.float32)
        # An all-zero (or non-finite) embedding has no direction to search by: e.g. EfficientNet-Lite2
        # at 32 px maps some near-blank images to all-zero features. Quarantined, never written.
        degenerate = ~np.isfinite(emb).all(axis=1) | (np.linalg.norm(np.nan_to_num(emb), axis=1) < 1e-6)
        keep = ~degenerate
        stats = dict.fromkeys(COUNT_KEYS, 0)
        if self.teacher is not None:
            mapped = self.label_map.apply(t_cls)
            no_match = unlabelled & (mapped < 0)
            low = unlabelled & (mapped >= 0) & (t_conf < self.min_confidence)
            pseudo = unlabelled & ~no_match & ~low & ~degenerate
            out_labels[pseudo] = mapped[pseudo]
            label_source[pseudo] = "teacher"
            confidence[unlabelled] = t_conf[unlabelled]
            keep &= ~(no_match | low)
            evaluated = pseudo & (truth >= 0)
            stats.update(pseudo_labelled=int(pseudo.sum()), excluded_no_correspondence=int(no_match.sum()),
                         below_confidence=int(low.sum()), pseudo_evaluated=int(evaluated.sum()),
                         pseudo_correct=int((out_labels[evaluated] == truth[evaluated]).sum()))
        else:
            confidence[unlabelled] = 0.0  # no label and no teacher: kept, label -1, confidence 0
            stats["unlabelled"] = int((unlabelled & keep).sum())
        stats.update(read=int(decoded["read"]), quarantined=len(decoded["errors"]) + int(degenerate.sum()),
                     embedded=int(keep.sum()),
                     human_labelled=int((~unlabelled & keep).sum()), hidden_labels=int((truth >= 0).sum()),
                     encode_seconds=round(time.perf_counter() - t0, 3))
        table = schema.embedding_table(
            decoded["ids"][keep], emb[keep], out_labels[keep], dtype=self.dtype,
            provenance={"label_source": label_source[keep], "confidence": confidence[keep],
                        "source": np.full(int(keep.sum()), self.source_name, dtype=object),
                        "uri": decoded["uris"][keep]},
            metadata={**metadata, "input_shard": shard_name})
        errors = [(i, u, r, shard_name, self.source_name) for i, u, r in decoded["errors"]]
        reason = (f"encoder {getattr(self.encoder, 'name', 'encoder')} gave an all-zero or non-finite embedding "
                  "(no direction to search by)")
        errors += [(decoded["ids"][r], decoded["uris"][r], reason, shard_name, self.source_name)
                   for r in np.flatnonzero(degenerate)]
        return table, errors, stats


def summarise(stats: list[dict]) -> dict:
    """Sum per-shard counts; pseudo-label accuracy over rows whose true label was hidden."""
    totals = {k: int(sum(s.get(k, 0) for s in stats)) for k in COUNT_KEYS}
    acc = totals["pseudo_correct"] / totals["pseudo_evaluated"] if totals["pseudo_evaluated"] else None
    return {"counts": totals, "pseudo_label_accuracy": acc}


def file_sha256(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Ray wrappers
# ----------------------------------------------------------------------------------------------------

def _decode_task(source: Source, shard: InputShard, image_size: int, max_pixels: int) -> dict:
    return decode_shard(source, shard, image_size, max_pixels)


class _Progress:
    """Counts images done across workers; the driver polls it for the progress bar."""

    def __init__(self):
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def get(self) -> int:
        return self.done


class EncoderWorker:
    """A Ray actor: loads the encoder (and teacher) once, then processes whole input shards.

    Only names, paths and small dicts cross the process boundary; models are built here.
    """

    def __init__(self, encoder: str, image_size: int, teacher: str | None, label_map: dict | None,
                 min_confidence: float, batch_size: int, dtype: str, threads: int, device: str, out: str,
                 source_name: str):
        import torch

        from pipelines.encoders import load_encoder
        from pipelines.teachers import LabelMap, load_teacher

        torch.set_num_threads(max(1, threads))
        self.encoder = load_encoder(encoder, image_size, device=device)
        teacher_obj = None
        if teacher:
            teacher_obj = load_teacher(teacher)
            teacher_obj.bind(self.encoder)
        self.processor = ShardProcessor(self.encoder, teacher_obj, LabelMap(label_map) if teacher else None,
                                        min_confidence=min_confidence, batch_size=batch_size, dtype=dtype,
                                        source_name=source_name)
        # One batch through the network at the run's shape builds the kernels once, before any shard arrives.
        self.encoder.embed(np.zeros((batch_size, image_size, image_size, 3), np.uint8))
        self.layout = outputs.OutputLayout(out)
        self.metadata = {"encoder": self.encoder.name, "encoder_version": self.encoder.version,
                         "image_size": self.encoder.image_size, "teacher": teacher_obj.name if teacher_obj else ""}

    def ready(self) -> dict:
        return {"name": self.encoder.name, "version": self.encoder.version, "dim": self.encoder.dim,
                "image_size": self.encoder.image_size, "device": self.encoder.device, "pid": os.getpid()}

    def process(self, shard: InputShard, decoded: dict, progress) -> dict:
        if decoded["errors"]:
            progress.add.remote(len(decoded["errors"]))
        table, errors, stats = self.processor.process(shard.name, decoded, self.metadata,
                                                      on_batch=lambda n: progress.add.remote(n))
        self.layout.write_shard(shard.name, table, errors, stats)
        return {"shard": shard.name, **stats}


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


def resolve(cfg: EmbedConfig):
    """Check everything at the door (before Ray starts): source, encoder size, teacher, label map."""
    from pipelines.encoders import encoder_image_size
    from pipelines.teachers import load_teacher, resolve_label_map

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
    source = open_source(cfg.source)
    image_size = encoder_image_size(cfg.encoder, cfg.image_size)
    teacher = load_teacher(cfg.teacher) if cfg.teacher else None
    label_map = resolve_label_map(teacher, cfg.label_map) if teacher else None
    identity = {
        "source": source.spec.uri, "source_kind": source.spec.kind, "source_name": source.spec.name,
        "split": source.spec.split if source.spec.kind == "idx" else None, "shard_size": source.spec.shard_size,
        "limit": source.spec.limit, "unlabelled_fraction": source.spec.unlabelled_fraction,
        "image_column": source.spec.image_column if source.spec.kind == "parquet" else None,
        "label_column": source.spec.label_column if source.spec.kind == "parquet" else None,
        "encoder": cfg.encoder, "image_size": image_size, "dtype": cfg.dtype, "max_pixels": cfg.max_pixels,
        "teacher": cfg.teacher, "label_map_sha256": file_sha256(cfg.label_map) if cfg.label_map else None,
        "min_confidence": cfg.min_confidence if teacher else None,
    }
    return source, image_size, teacher, label_map, identity


def run_embed(cfg: EmbedConfig) -> dict:
    """Embed (and pseudo-label) a source into ``cfg.out``; skip input shards already complete.

    Returns:
        The run summary (also written to ``OUT/summary.json``).

    Raises:
        FileNotFoundError: the source, a weights folder, a probe or a label map does not exist.
        ValueError: bad options, or ``OUT`` holds a different run.
    """
    import ray
    from ray.util import ActorPool

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
    new_stats, workers_info, ray_info = [], None, None
    t_encode = None
    if todo:
        started = _init_ray(cfg.ray_address)
        try:
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
            device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
            if device == "cuda" and not gpus:
                raise ValueError("--device cuda but the Ray cluster has no GPU")
            num_workers = cfg.num_workers or (gpus if device == "cuda" else max(1, int(cpus) // 4))
            if num_workers < 1:
                raise ValueError(f"num workers must be >= 1, got {num_workers}")
            threads = cfg.threads_per_worker or max(1, int(cpus) // num_workers)
            # Leave one CPU slot for decoding tasks, or they could never be scheduled.
            actor_cpus = 1.0 if cpus - num_workers >= 1 else max(0.0, (cpus - 1) / num_workers)
            opts = dict(num_cpus=actor_cpus, max_restarts=3, max_task_retries=3)
            if device == "cuda":
                opts["num_gpus"] = 1
            worker_cls = ray.remote(EncoderWorker).options(**opts)
            workers = [worker_cls.remote(cfg.encoder, image_size, cfg.teacher,
                                         label_map.mapping if label_map else None, cfg.min_confidence,
                                         cfg.batch_size, cfg.dtype, threads, device, cfg.out, source.spec.name)
                       for _ in range(num_workers)]
            decode = ray.remote(num_cpus=min(1.0, cpus - actor_cpus * num_workers) or 0.5, max_retries=3)(_decode_task)
            window = 2 * num_workers
            # The first shards decode while the actors load their models.
            source_ref = ray.put(source)  # once: a folder source carries its whole file listing
            prefetched = [(s, decode.remote(source_ref, s, image_size, cfg.max_pixels)) for s in todo[:window]]
            workers_info = ray.get([w.ready.remote() for w in workers])
            ray_info = {"address": cfg.ray_address or "local", "workers": num_workers,
                        "threads_per_worker": threads, "device": device, "cluster_cpus": cpus, "cluster_gpus": gpus}
            progress = ray.remote(num_cpus=0)(_Progress).remote()
            t_encode = time.perf_counter()
            new_stats = _drive(ActorPool(workers), decode, progress, source_ref, todo, prefetched, image_size, cfg,
                               window)
            t_encode = time.perf_counter() - t_encode
        finally:
            if started:
                ray.shutdown()
    all_stats = [{k: v for k, v in s.items() if k != "metadata"} for s in done_before.values()] + new_stats
    summary = _summary(cfg, source, identity, teacher, label_map, shards, done_before, new_stats, all_stats,
                       workers_info, ray_info, time.perf_counter() - t_start, t_encode)
    layout.write_summary(summary)
    return summary


def _drive(pool, decode, progress, source_ref, todo, prefetched, image_size, cfg, window) -> list[dict]:
    """Feed shards to the pool with at most ``window`` in flight (the first ones already decoding);
    a progress bar tracks images/s and the time left."""
    import ray
    from tqdm import tqdm

    sizes = [s.size for s in todo]
    total = None if any(s is None for s in sizes) else sum(sizes)
    bar = tqdm(total=total, desc="embed", unit="img", disable=not cfg.progress, dynamic_ncols=True)
    pending = list(todo)
    ready = dict((s.name, ref) for s, ref in prefetched)
    stats, in_flight = [], 0

    def refresh():
        done = ray.get(progress.get.remote())  # a retried shard counts twice: never run past the total
        bar.update(max(0, (min(done, total) if total else done) - bar.n))

    def submit():
        shard = pending.pop(0)
        if shard.name in ready:
            decoded = ready.pop(shard.name)
        else:
            decoded = decode.remote(source_ref, shard, image_size, cfg.max_pixels)
        pool.submit(lambda actor, v: actor.process.remote(*v), (shard, decoded, progress))

    try:
        while pending and in_flight < window:
            submit()
            in_flight += 1
        while pool.has_next():
            try:
                result = pool.get_next_unordered(timeout=0.5)
            except TimeoutError:
                refresh()
                continue
            stats.append(result)
            in_flight -= 1
            if pending:
                submit()
                in_flight += 1
        refresh()
    finally:
        bar.close()
    return stats


def _summary(cfg, source, identity, teacher, label_map, shards, done_before, new_stats, all_stats,
             workers_info, ray_info, wall_s, encode_s) -> dict:
    encoder = None
    if workers_info:
        w = workers_info[0]
        encoder = {"name": w["name"], "version": w["version"], "dim": w["dim"], "image_size": w["image_size"]}
    elif done_before:
        meta = next(iter(done_before.values()))["metadata"]
        encoder = {"name": meta.get("encoder"), "version": meta.get("encoder_version"),
                   "dim": int(meta.get("dim", 0)), "image_size": int(meta.get("image_size", 0))}
    if encoder is not None:
        encoder["dtype"] = cfg.dtype
    this_run = sum(s["read"] for s in new_stats)
    totals = summarise(all_stats)
    return {
        "source": {"uri": source.spec.uri, "kind": source.spec.kind, "name": source.spec.name,
                   "split": identity["split"], "unlabelled_fraction": source.spec.unlabelled_fraction,
                   "class_names": source.class_names},
        "out": cfg.out,
        "encoder": encoder,
        "teacher": None if teacher is None else {
            "spec": cfg.teacher, "name": teacher.name, "label_map": cfg.label_map,
            "label_map_entries": len(label_map.mapping), "min_confidence": cfg.min_confidence},
        "shards": {"total": len(shards), "written_this_run": len(new_stats), "complete_before": len(done_before)},
        **totals,
        "throughput": {
            "images_this_run": this_run, "wall_s": round(wall_s, 2),
            "images_per_s": round(this_run / wall_s, 2) if wall_s > 0 else None,
            "encode_wall_s": None if encode_s is None else round(encode_s, 2),
            "encode_images_per_s": round(this_run / encode_s, 2) if encode_s else None,
        },
        "ray": ray_info,
        "embeddings": outputs.OutputLayout(cfg.out).embeddings_dir,
        "errors": outputs.OutputLayout(cfg.out).errors_dir if totals["counts"]["quarantined"] else None,
    }

