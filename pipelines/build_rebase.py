"""An add's manifest on top of whichever version is latest when it publishes (its rebase).

An add checks its rows against its parent version (duplicates, the forget list) and writes new
shards that depend on nothing else, so when removals, compactions or other adds publish meanwhile
it need not start again: it appends its shards to the new latest version. Only what changed since
its parent can conflict, and that is re-checked here: an id forgotten meanwhile (removed during the
add) or added meanwhile by another add is tombstoned in the add's shards, so the result equals
applying the changes in version order; class lists that grew apart are refused.
"""
from __future__ import annotations

from memory import manifest as mf
from memory import mutations, removals, storage
from memory.items import read_items_at
from pipelines.build_config import BuildConfig


class Rebase:
    """Derives an add's manifest from any later version; caches what it reads between tries."""

    def __init__(self, cfg: BuildConfig, parent: mf.Manifest, entries: list, readmitted: set):
        self.cfg, self.parent, self.entries, self.readmitted = cfg, parent, list(entries), set(readmitted)
        self._ids: dict[str, list] = {}
        self._parent_forget: set | None = None

    def _shard_ids(self, path: str) -> list:
        if path not in self._ids:
            table = read_items_at(storage.join(self.cfg.out, path), ["id"])
            self._ids[path] = table.column("id").to_pylist()
        return self._ids[path]

    def _classes(self, latest: mf.Manifest) -> list:
        ours, theirs = list(self.cfg.class_names), list(latest.class_names)
        if ours[:len(theirs)] == theirs:
            return ours
        if theirs[:len(ours)] == ours:
            return theirs
        raise ValueError(f"version {latest.version} of {self.cfg.out} changed the classes to {theirs} while this "
                         f"add was running with {ours}; nothing was published: run the add again")

    def conflicts(self, latest: mf.Manifest) -> tuple[list, int, int]:
        """``(our (shard, id) pairs to tombstone, ids forgotten meanwhile, ids added meanwhile)``."""
        if self._parent_forget is None:
            self._parent_forget = set(removals.forget_list(self.cfg.out, self.parent).column("id").to_pylist())
        forgotten = set(removals.forget_list(self.cfg.out, latest).column("id").to_pylist()) - self._parent_forget
        old = {e.path for e in self.parent.shards} | {e.path for e in self.entries}
        dead = removals.tombstones_by_shard(self.cfg.out, latest)
        added = set()
        for e in latest.shards:
            if e.path not in old:  # shards another add (or a compaction) published meanwhile
                added.update(i for i in self._shard_ids(e.path) if i not in dead.get(e.path, ()))
        pairs = [(e.path, i) for e in self.entries for i in self._shard_ids(e.path) if i in forgotten or i in added]
        return pairs, len(forgotten), len(added)

    def manifest(self, latest: mf.Manifest, detail: dict) -> mf.Manifest:
        """The add's manifest as version ``latest.version + 1``."""
        cfg, version = self.cfg, latest.version + 1
        names = self._classes(latest)
        tombstones = forget = "keep"
        if latest.version != self.parent.version:
            pairs, forgotten, added = self.conflicts(latest)
            detail["rebased"] = {"from": self.parent.version, "onto": latest.version, "tombstoned": len(pairs)}
            if pairs:
                old = removals.tombstones(cfg.out, latest)
                pairs += list(zip(old.column("shard").to_pylist(), old.column("id").to_pylist()))
                rel = removals.state_path(version, "tombstones.parquet", cfg.token)
                tombstones = removals.write_table(cfg.out, rel, removals.tombstones_table(pairs))
        if self.readmitted:
            old = removals.forget_list(cfg.out, latest)
            rows = [r for r in zip(old.column("id").to_pylist(), old.column("version").to_pylist(),
                                   old.column("reason").to_pylist()) if r[0] not in self.readmitted]
            forget = removals.write_table(cfg.out, removals.state_path(version, "forget.parquet", cfg.token),
                                          removals.forget_table(rows))
            detail["readmitted"] = len(self.readmitted)
        return mutations.derive_manifest(latest, version=version, change="add", detail=detail,
                                         shards=[*latest.shards, *self.entries], tombstones=tombstones,
                                         forget=forget, class_names=names)
