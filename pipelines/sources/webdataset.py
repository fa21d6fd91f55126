"""WebDataset sources: tar files whose members are grouped into samples by key; one tar per input shard."""
from __future__ import annotations

import json
import posixpath
import tarfile

from memory import storage, uris
from pipelines.sources.base import InputShard, Record, Source


class WebDatasetSource(Source):
    """WebDataset-style tars: members grouped by key (path up to the first dot of the basename);
    the image is the first member with an image extension, the label a ``.cls`` integer or a
    ``.json`` object's ``label``. Each tar is one input shard."""

    def shards(self) -> list[InputShard]:
        if self.spec.limit:
            raise ValueError("--limit is not supported for WebDataset sources (their sample counts are only "
                             "known by reading every tar); pass fewer tar files instead")
        tars = [f for f in storage.find_files(self.spec.uri) if f.endswith(".tar")]
        if not tars:
            raise ValueError(f"source {self.spec.uri} holds no .tar files")
        return [InputShard(i, len(tars), (t,)) for i, t in enumerate(tars)]

    def read(self, shard: InputShard):
        (tar,) = shard.items
        tar_name = posixpath.basename(tar)
        samples, error = _samples(tar)
        if error is not None:
            # A broken tar: the samples read before the break are kept, the rest is one quarantined record.
            yield Record(f"{self.spec.name}/{tar_name}", tar, -1, -1, OSError(f"unreadable tar: {error}"))
        for key, members in samples.items():
            image = next((members[e] for e in uris.WDS_IMAGE_EXTS if e in members), None)
            if image is None:
                image = ValueError(f"no image member in sample (members: {', '.join(sorted(members))})")
            yield self._record(f"{self.spec.name}/{tar_name}/{key}", uris.tar_uri(tar, key), _label(members), image)


def _samples(tar: str) -> tuple[dict[str, dict[str, bytes]], Exception | None]:
    """``({key: {extension: bytes}}, error)`` in tar order; ``error`` is what stopped the read, if anything."""
    samples: dict[str, dict[str, bytes]] = {}
    fs, p = storage.filesystem(tar)
    try:
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as stream:
            for member in stream:
                if not member.isfile():
                    continue
                named = uris.wds_member(member.name)
                if named:
                    samples.setdefault(named[0], {})[named[1]] = stream.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        return samples, exc
    return samples, None


def _label(members: dict) -> int:
    if "cls" in members:
        return int(members["cls"].decode().strip())
    if "json" in members:
        value = json.loads(members["json"]).get("label", -1)
        return int(value) if value is not None else -1
    return -1
