"""The demo's sizes and the paths of its stages' outputs under one folder."""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What ``vismem demo`` runs on; every stage writes under ``out_dir``."""

    out_dir: str
    train: int
    test: int
    unlabelled_fraction: float
    image_size: int
    num_shards: int
    backend: str
    k_max: int
    compare_encoders: tuple[str, ...]

    @property
    def emb_train(self) -> str:
        return os.path.join(self.out_dir, "emb-train")

    @property
    def emb_test(self) -> str:
        return os.path.join(self.out_dir, "emb-test")

    @property
    def emb_memory(self) -> str:
        """The human-labelled and the pseudo-labelled training rows, one shard each."""
        return os.path.join(self.out_dir, "emb-memory")

    @property
    def memory(self) -> str:
        return os.path.join(self.out_dir, "memory")

    @property
    def report_dir(self) -> str:
        return os.path.join(self.out_dir, "report")
