"""The summary of an embedding run (``OUT/summary.json``): counts, pseudo-label accuracy, throughput."""
from __future__ import annotations

import dataclasses

from memory.encoder_spec import EncoderSpec
from pipelines import outputs

COUNT_KEYS = ("read", "quarantined", "embedded", "human_labelled", "unlabelled", "pseudo_labelled",
              "excluded_no_correspondence", "below_confidence", "hidden_labels", "pseudo_evaluated",
              "pseudo_correct")


@dataclasses.dataclass
class EncodeRun:
    """What this run's encoding stage did: per-shard stats, the workers' ``ready()`` answers, Ray's layout."""

    stats: list[dict] = dataclasses.field(default_factory=list)
    workers: list[dict] | None = None
    ray: dict | None = None
    encode_s: float | None = None


def summarise(stats: list[dict]) -> dict:
    """Sum per-shard counts; pseudo-label accuracy over rows whose true label was hidden."""
    totals = {k: int(sum(s.get(k, 0) for s in stats)) for k in COUNT_KEYS}
    acc = totals["pseudo_correct"] / totals["pseudo_evaluated"] if totals["pseudo_evaluated"] else None
    return {"counts": totals, "pseudo_label_accuracy": acc}


def build_summary(cfg, source, identity: dict, teacher, label_map, shards: list, done_before: dict,
                  run: EncodeRun, wall_s: float) -> dict:
    """The summary of a run of ``cfg`` (an ``EmbedConfig``): shards written before count, not their time."""
    all_stats = [{k: v for k, v in s.items() if k != "metadata"} for s in done_before.values()] + run.stats
    this_run = sum(s["read"] for s in run.stats)
    totals = summarise(all_stats)
    layout = outputs.OutputLayout(cfg.out)
    return {
        "source": {"uri": source.spec.uri, "kind": source.spec.kind, "name": source.spec.name,
                   "split": identity["split"], "unlabelled_fraction": source.spec.unlabelled_fraction,
                   "class_names": source.class_names},
        "out": cfg.out,
        "encoder": _encoder(run.workers, done_before, cfg.dtype),
        "teacher": None if teacher is None else {
            "spec": cfg.teacher, "name": teacher.name, "label_map": cfg.label_map,
            "label_map_entries": len(label_map.mapping), "min_confidence": cfg.min_confidence},
        "shards": {"total": len(shards), "written_this_run": len(run.stats), "complete_before": len(done_before)},
        **totals,
        "throughput": {
            "images_this_run": this_run, "wall_s": round(wall_s, 2),
            "images_per_s": round(this_run / wall_s, 2) if wall_s > 0 else None,
            "encode_wall_s": None if run.encode_s is None else round(run.encode_s, 2),
            "encode_images_per_s": round(this_run / run.encode_s, 2) if run.encode_s else None,
        },
        "ray": run.ray,
        "embeddings": layout.embeddings_dir,
        "errors": layout.errors_dir if totals["counts"]["quarantined"] else None,
    }


def _encoder(workers: list[dict] | None, done_before: dict, dtype: str) -> dict | None:
    """The encoder's spec as the workers reported it, or as the shards written before record it."""
    if workers:
        spec, dim = workers[0]["spec"], workers[0]["dim"]
    elif done_before:
        meta = next(iter(done_before.values()))["metadata"]
        spec, dim = EncoderSpec.from_metadata(meta), int(meta.get("dim", 0))
    else:
        return None
    return {**(spec.to_manifest() if spec else {}), "dim": dim, "dtype": dtype}
