"""Shared plumbing of the experiments: labelled arrays in, exact neighbour lists out."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from memory import schema, voting
from memory.memory import Memory, write_memory


@dataclasses.dataclass
class Split:
    """Embeddings (L2-normalised), labels and ids of one labelled set."""

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def take(self, rows) -> "Split":
        return Split(self.embeddings[rows], self.labels[rows], self.ids[rows])

    def __len__(self) -> int:
        return len(self.labels)


def neighbours(memory: Split, queries: np.ndarray, k: int, class_names, *, num_shards: int = 1,
               workdir: str | None = None):
    """Write ``memory`` as a real (exact) memory, search ``queries``, return the neighbours."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="vismem-exp-") as tmp:
        path = os.path.join(tmp, "memory")
        write_memory(path, memory.embeddings, memory.labels, memory.ids, num_shards=num_shards,
                     class_names=class_names)
        with Memory.open(path, verify=False) as mem:
            return mem.search(queries, min(k, len(memory)))


def tie_note(ties: str) -> str:
    """What a report adds when a tie rule other than the default settled the votes."""
    voting.check_ties(ties)
    if ties == "nearest":
        return ""
    return "; ties settled by the running leader (`--ties leader`, the released code's rule)"


def table(header, rows) -> list:
    """The lines of a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def read_split(path: str, *, labelled_only: bool = True, label_source: str | None = None) -> Split:
    """Read one embedding shard, a directory of them, or a glob, into one :class:`Split`.

    ``label_source`` keeps only rows labelled by ``human`` or by a ``teacher``.
    """
    data = schema.read_embedding_shards(path)
    emb, labels, ids = data["embeddings"], data["labels"], data["ids"]
    keep = labels >= 0 if labelled_only else np.ones(len(labels), bool)
    if label_source is not None:
        keep &= data["provenance"]["label_source"] == label_source
    return Split(emb[keep] / np.linalg.norm(emb[keep], axis=1, keepdims=True), labels[keep], ids[keep])


def write_part(out_dir: str, name: str, result: dict) -> str:
    """Write an experiment's report part and figures, then rebuild ``experiments.md`` from every part."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result["figures"], f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    with open(os.path.join(out_dir, f"report-{name}.md"), "w") as f:
        f.write(result["report"])
    if result.get("plot"):  # a callable that draws the part's figure into out_dir
        result["plot"](out_dir)
    parts = sorted(n for n in os.listdir(out_dir) if n.startswith("report-") and n.endswith(".md"))
    body = ["# Capability experiments", ""] + [open(os.path.join(out_dir, n)).read() for n in parts]
    path = os.path.join(out_dir, "experiments.md")
    with open(path, "w") as f:
        f.write("\n".join(body))
    return path
