"""Search filters: which items a search may return, by their provenance (``label_source``, ``source``).

A filter is applied inside each shard (``Shard.search_rows``), like a removal: the shard over-fetches
past the items it may not return, so every query still gets its k nearest allowed items. Users ask
for it first (search only human-labelled items, or leave one crawl out); a pseudo-labelled memory
can then be evaluated with and without its teacher's labels from one set of shards.

Text forms (CLI and HTTP): ``label_source=human`` or ``source=imagenet,web`` (values comma
separated); a filter includes items matching every ``include`` and no ``exclude``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memory.schema import LABEL_SOURCES

FIELDS = ("label_source", "source")


@dataclasses.dataclass(frozen=True)
class ItemFilter:
    """Allowed values per field (``include``; None: any) and refused values per field (``exclude``).

    Frozen and hashable: shards cache one mask per filter. Build it with :meth:`of`.
    """

    include: tuple = ()  # ((field, frozenset of values), ...), sorted by field
    exclude: tuple = ()

    @classmethod
    def of(cls, include: dict | None = None, exclude: dict | None = None) -> "ItemFilter | None":
        """A filter from ``{field: values}`` maps (a value: a string or a list of strings); None when
        both are empty (no filter at all).

        Raises:
            ValueError: an unknown field, no values for a field, a value that is not a string, or a
                ``label_source`` that is not one of ``memory.schema.LABEL_SOURCES``.
        """
        inc, exc = _checked(include, "include"), _checked(exclude, "exclude")
        if not inc and not exc:
            return None
        return cls(tuple(sorted(inc.items())), tuple(sorted(exc.items())))

    @classmethod
    def parse(cls, include=(), exclude=()) -> "ItemFilter | None":
        """A filter from text terms ``FIELD=V1[,V2...]`` (the CLI's ``--include`` / ``--exclude``);
        a field given twice on one side takes the union of its values."""
        return cls.of(_terms(include, "--include"), _terms(exclude, "--exclude"))

    def allowed(self, columns: dict) -> np.ndarray:
        """Boolean mask over items whose ``columns`` (field -> array of strings) pass the filter."""
        keep = np.ones(len(next(iter(columns.values()))), dtype=bool)
        for field, values in columns.items():
            keep &= self.allowed_values(field, values)
        return keep

    def allowed_values(self, field: str, values) -> np.ndarray:
        """Boolean mask over ``values`` of ``field`` this filter lets through (a shard applies it to
        each distinct value once, then to its items by code)."""
        values = np.asarray(values, dtype=object)
        keep = np.ones(len(values), dtype=bool)
        for f, vs in self.include:
            if f == field:
                keep &= np.isin(values, list(vs))
        for f, vs in self.exclude:
            if f == field:
                keep &= ~np.isin(values, list(vs))
        return keep

    def to_json(self) -> dict:
        return {side: {f: sorted(v) for f, v in getattr(self, side)} for side in ("include", "exclude")}

    def describe(self) -> str:
        parts = [f"{f} in {{{', '.join(sorted(v))}}}" for f, v in self.include]
        parts += [f"{f} not in {{{', '.join(sorted(v))}}}" for f, v in self.exclude]
        return " and ".join(parts)


def _checked(spec, side: str) -> dict:
    out = {}
    for field, values in (spec or {}).items():
        if field not in FIELDS:
            raise ValueError(f"cannot filter on {field!r} ({side}); filter fields are: {', '.join(FIELDS)}")
        values = [values] if isinstance(values, str) else list(values or ())
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"{side} {field}: give one or more non-empty strings, got {values!r}")
        if field == "label_source" and set(values) - set(LABEL_SOURCES):
            bad = sorted(set(values) - set(LABEL_SOURCES))
            raise ValueError(f"{side} label_source: unknown {', '.join(map(repr, bad))}; "
                             f"label sources are {', '.join(LABEL_SOURCES)}")
        out[field] = out.get(field, frozenset()) | frozenset(values)
    return out


def _terms(terms, option: str) -> dict:
    out: dict = {}
    for term in terms or ():
        field, eq, values = str(term).partition("=")
        if not eq or not field.strip() or not values.strip():
            raise ValueError(f"{option} {term!r}: write FIELD=VALUE[,VALUE...], e.g. label_source=human")
        out.setdefault(field.strip(), []).extend(v.strip() for v in values.split(",") if v.strip())
    return out
