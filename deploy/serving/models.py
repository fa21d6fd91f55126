"""The API's request and response models (they make the OpenAPI schema) and the per-request limits."""
from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from memory import voting


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything more is refused with a 4xx naming the limit."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_batch: int = 256        # queries (embeddings or images) per request
    max_k: int = 1000
    max_add_items: int = 10_000  # items per admin add
    max_remove_ids: int = 100_000


_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class Query(BaseModel):
    model_config = _STRICT
    embeddings: list[list[float]] | None = Field(
        None, description="query embeddings, one row per query (L2-normalised by the server)",
        examples=[[[0.1, 0.7, 0.2]]])
    images: list[str] | None = Field(
        None, description="base64-encoded image files (PNG, JPEG, ...); needs a server started with --encoder")
    k: int = Field(10, description="neighbours per query")
    probe_shards: int | None = Field(
        None, ge=1, description="k-means memories: search only the P shards nearest each query (default: all)")


class ClassifyQuery(Query):
    k: int = Field(50, description="neighbours that vote")
    method: Literal[tuple(voting.METHODS)] = Field("rank", description="voting rule")  # type: ignore[valid-type]
    alpha: float = Field(2.0, gt=0, description="rank voting: w = 1 / (alpha + rank)")
    tau: float = Field(0.07, gt=0, description="softmax voting temperature")
    xi: float = Field(1.0, gt=0, description="distance voting exponent")
    use_weights: bool = Field(True, description="apply the items' vote multipliers (soft pruning)")
    neighbours: bool = Field(True, description="include the neighbours behind each decision")


class Neighbour(BaseModel):
    id: str
    label: int
    label_name: str | None
    sim: float


class NeighboursResponse(BaseModel):
    version: int
    neighbours: list[list[Neighbour]]


class Decision(BaseModel):
    label: str | None = Field(description="predicted class name (null when no neighbour could vote)")
    label_index: int
    scores: dict[str, float] = Field(description="the voting rule's score per class")
    neighbours: list[Neighbour] | None = None


class ClassifyResponse(BaseModel):
    version: int
    method: str
    k: int
    results: list[Decision]


class Item(BaseModel):
    model_config = _STRICT
    id: str = Field(min_length=1, max_length=1024)
    embedding: list[float]
    label: str = Field(description="class name; new names need class_names")
    source: str = ""
    uri: str = ""


class AddRequest(BaseModel):
    model_config = _STRICT
    items: list[Item] = Field(min_length=1)
    class_names: list[str] | None = Field(
        None, description="the memory's classes in order followed by new ones, when adding new classes")
    readmit: bool = Field(False, description="accept ids that were removed (unlearned) before")


class RemoveRequest(BaseModel):
    model_config = _STRICT
    ids: list[str] | None = Field(None, description="item ids to remove")
    label: str | None = Field(None, description="remove every item of this class")
    source: str | None = Field(None, description="remove every item from this source")
    reason: str | None = None
