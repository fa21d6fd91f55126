"""Image-folder sources: every file is a record; top-level sub-folders name the classes."""
from __future__ import annotations

import functools
import posixpath

from memory import storage, uris
from pipelines.sources.base import InputShard, Source


class FolderSource(Source):
    """A directory of image files; with sub-folders, each top-level sub-folder is a class (sorted names)."""

    @functools.cached_property
    def _listing(self) -> list[str]:
        return [posixpath.relpath(f, self.spec.uri) for f in storage.find_files(self.spec.uri)]

    @functools.cached_property
    def class_names(self) -> list[str]:
        return sorted({rel.split("/")[0] for rel in self._listing if "/" in rel})

    def shards(self) -> list[InputShard]:
        if not self._listing:
            raise ValueError(f"source {self.spec.uri} holds no files")
        return self._cut(self._listing)

    def read(self, shard: InputShard):
        classes = {c: i for i, c in enumerate(self.class_names)}
        fs, root = storage.filesystem(self.spec.uri)
        for rel in shard.items:
            label = classes[rel.split("/")[0]] if "/" in rel else -1
            uri = uris.folder_uri(self.spec.uri, rel)
            try:
                with fs.open(f"{root}/{rel}", "rb") as f:
                    payload = f.read()
            except OSError as exc:  # unreadable file: the decoder quarantines it with this reason
                payload = exc
            yield self._record(f"{self.spec.name}/{rel}", uri, label, payload)
