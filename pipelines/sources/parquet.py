"""Parquet sources: an image-bytes column, optional label and ``id`` columns; row ranges are input shards."""
from __future__ import annotations

import posixpath

from memory import storage, uris
from pipelines.sources.base import InputShard, Source, shard_bounds


class ParquetSource(Source):
    """Parquet files with an image-bytes column (binary, or a struct with ``bytes`` as Hugging Face
    datasets store images), an optional integer label column and an optional ``id`` column."""

    def shards(self) -> list[InputShard]:
        files = [f for f in storage.find_files(self.spec.uri) if f.endswith(".parquet")]
        if not files:
            raise ValueError(f"source {self.spec.uri} holds no .parquet files")
        pieces = [piece for f in files for piece in self._pieces(f)]
        if self.spec.limit:
            pieces = _first_rows(pieces, self.spec.limit)
        return [InputShard(i, len(pieces), piece, piece[2] - piece[1]) for i, piece in enumerate(pieces)]

    def _pieces(self, f: str) -> list[tuple[str, int, int]]:
        """``(file, start, stop)`` row ranges of one file, after checking it has the image column."""
        import pyarrow.parquet as pq

        fs, p = storage.filesystem(f)
        with fs.open(p, "rb") as fh:
            meta = pq.ParquetFile(fh)
            names = meta.schema_arrow.names
            n = meta.metadata.num_rows
        if self.spec.image_column not in names:
            raise ValueError(f"{f}: no image column {self.spec.image_column!r} (columns: {', '.join(names)}); "
                             "pass --image-column")
        return [(f, a, b) for a, b in shard_bounds(n, self.spec.shard_size)]

    def read(self, shard: InputShard):
        import pyarrow.parquet as pq

        f, a, b = shard.items
        fs, p = storage.filesystem(f)
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh).slice(a, b - a)
        images = table.column(self.spec.image_column).to_pylist()
        labels = (table.column(self.spec.label_column).to_pylist() if self.spec.label_column in table.column_names
                  else [None] * len(table))
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        base = posixpath.basename(f)
        for j, (img, label) in enumerate(zip(images, labels)):
            row = a + j
            rid = f"{self.spec.name}/{ids[j]}" if ids else f"{self.spec.name}/{base}/{row}"
            if isinstance(img, dict):
                img = img.get("bytes")
            yield self._record(rid, uris.parquet_uri(f, row), -1 if label is None else int(label),
                               b"" if img is None else img)


def _first_rows(pieces: list[tuple[str, int, int]], limit: int) -> list[tuple[str, int, int]]:
    """The pieces cut down to their first ``limit`` rows in total."""
    kept, left = [], limit
    for f, a, b in pieces:
        if left <= 0:
            break
        kept.append((f, a, min(b, a + left)))
        left -= kept[-1][2] - a
    return kept
