"""Parquet sources: an image-bytes column, optional label and ``id`` columns; row ranges are input shards."""
from __future__ import annotations

import posixpath

from memory import storage, uris
from pipelines.sources.base import InputShard, Source, shard_bounds


class ParquetSource(Source):
    """Parquet files with an image-bytes column (binary, or a struct with ``bytes`` as Hugging Face
    datasets store images), an optional integer label column and an optional ``id`` column."""

    _listed: list | None = None  # the input shards, once listed by check() at the door

    def check(self) -> None:
        """List the input shards now (every file's footer: readable, with the image column), before any output."""
        self._listed = self.shards()

    def shards(self) -> list[InputShard]:
        if self._listed is not None:
            return self._listed
        files = [f for f in storage.find_files(self.spec.uri) if f.endswith(".parquet")]
        if not files:
            raise ValueError(f"source {self.spec.uri} holds no .parquet files")
        pieces = [piece for f in files for piece in self._pieces(f)]
        if self.spec.limit:
            pieces = _first_rows(pieces, self.spec.limit)
        return [InputShard(i, len(pieces), piece, piece[2] - piece[1]) for i, piece in enumerate(pieces)]

    def _pieces(self, f: str) -> list[tuple[str, int, int]]:
        """``(file, start, stop)`` row ranges of one file, after checking it has the image column."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, p = storage.filesystem(f)
        try:
            with fs.open(p, "rb") as fh:
                meta = pq.ParquetFile(fh)
                names = meta.schema_arrow.names
                n = meta.metadata.num_rows
        except pa.ArrowException as exc:  # pyarrow names a buffer, not the file
            raise ValueError(f"{f} is not a readable Parquet file: {exc}") from None
        if self.spec.image_column not in names:
            raise ValueError(f"{f}: no image column {self.spec.image_column!r} (columns: {', '.join(names)}); "
                             "pass --image-column")
        return [(f, a, b) for a, b in shard_bounds(n, self.spec.shard_size)]

    def read(self, shard: InputShard):
        import pyarrow.parquet as pq

        f, a, b = shard.items
        fs, p = storage.filesystem(f)
        with fs.open(p, "rb") as fh:
            # Only the row groups holding rows a..b, and only the columns used: a shard of a large file
            # reads its own part of it, not the whole file once per shard.
            pf = pq.ParquetFile(fh)
            groups, first = row_groups(pf.metadata, a, b)
            wanted = (self.spec.image_column, self.spec.label_column, "id")
            columns = [c for c in dict.fromkeys(wanted) if c in pf.schema_arrow.names]
            table = pf.read_row_groups(groups, columns=columns).slice(a - first, b - a)
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


def row_groups(metadata, start: int, stop: int) -> tuple[list[int], int]:
    """``(indices of the row groups holding rows start..stop-1, the first row of the first of them)``."""
    groups, first, offset = [], start, 0
    for i in range(metadata.num_row_groups):
        n = metadata.row_group(i).num_rows
        if offset < stop and offset + n > start:
            if not groups:
                first = offset
            groups.append(i)
        offset += n
    return groups, first


def _first_rows(pieces: list[tuple[str, int, int]], limit: int) -> list[tuple[str, int, int]]:
    """The pieces cut down to their first ``limit`` rows in total."""
    kept, left = [], limit
    for f, a, b in pieces:
        if left <= 0:
            break
        kept.append((f, a, min(b, a + left)))
        left -= kept[-1][2] - a
    return kept
