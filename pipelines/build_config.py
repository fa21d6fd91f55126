"""The plain configuration of one build or add: what the driver decides and every worker reads."""
from __future__ import annotations

import dataclasses
import math

from memory import manifest as mf

# The default shard size: a build without --num-shards cuts its rows into shards of at most this
# many items. The benchmarks here serve best from about 100k-150k items per shard (README: search
# and routing tables); ScaNN builds trees from about 5,000 items per shard (brute force below
# 20,000, memory.scann_index), so a shard never needs to be small to be fast, and fewer shards mean
# fewer searches per query.
TARGET_SHARD_ITEMS = 150_000


def default_num_shards(rows: int, target: int | None = None) -> int:
    """``ceil(rows / target)``, at least 1: the fewest shards that hold ``rows`` at ``target`` items each at
    most (default :data:`TARGET_SHARD_ITEMS`)."""
    return max(1, math.ceil(int(rows) / int(target or TARGET_SHARD_ITEMS)))


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything a worker needs: plain values and paths (it travels pickled to every worker)."""

    out: str
    version: int
    token: str
    parent_version: int | None
    files: tuple
    total_rows: int
    dim: int
    class_names: tuple
    num_shards: int
    partition: str = "hash"
    centroids: tuple | None = None  # an add reuses the memory's k-means cells and their shards
    cell_partitions: tuple | None = None
    backend: str = "scann"
    backend_params: dict = dataclasses.field(default_factory=dict)
    storage: str = "float32"  # memory.quantize.MODES
    target_recall: float | None = 0.95  # memory.tuning; None: ScaNN defaults, untuned
    tuning_queries: str | None = None  # embedding shards (a file, folder or glob) of real queries to tune on
    norm_tolerance: float | None = 0.01
    readmit: bool = False
    batch_rows: int = 65536
    kmeans_sample: int | None = None  # None: memory.partition.default_sample
    kmeans_cells: int | None = None
    seed: int = 0
    encoder: dict = dataclasses.field(default_factory=dict)  # EncoderSpec.to_manifest() of the inputs
    existing: tuple = ()  # add: ((shard path, removed ids), ...) of the memory's shards

    @property
    def storage_dtype(self) -> str:
        """The storage mode's older name (``build`` dicts of manifests written before modes record it)."""
        return self.storage

    def shard_name(self, partition: int) -> str:
        """A build's shards have the names ``write_memory`` gives; an add's say which version added them."""
        name = mf.shard_name(partition, self.num_shards)
        return name if self.parent_version is None else f"{name}-add-v{self.version:08d}"
