"""The API's request and response models (they make the OpenAPI schema) and the per-request limits."""
from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from memory import voting
from memory.schema import LABEL_SOURCES


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything more is refused with a 4xx naming the limit."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_batch: int = 256        # queries (embeddings or images) per request
    max_k: int = 1000
    max_add_items: int = 10_000  # items per admin add
    max_remove_ids: int = 100_000


# strict: JSON types as the schema says them (no "5" for 5, no 0 for false)
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON Schema's integer: 5 and 5.0 alike (never "5" or true), as the schema promises. (A bound goes
# before the validator: after it, pydantic writes it into the schema as "ge" instead of "minimum".)
Whole = Annotated[int, BeforeValidator(_whole)]
PositiveWhole = Annotated[int, Field(ge=1), BeforeValidator(_whole)]
NonEmpty = Annotated[str, Field(min_length=1)]


class EncoderDescription(BaseModel):
    """How the sender's embeddings were made (``memory.encoder_spec.EncoderSpec``); fields left out are
    not compared. The memory's own is in ``GET /v1/info`` (``encoder``)."""

    model_config = _STRICT
    name: str = Field(min_length=1, description="e.g. efficientnet-lite0")
    version: str | None = Field(None, description="of the encoder's weights")
    image_size: PositiveWhole | None = Field(None, description="input pixels per side")
    preprocessing: str | None = Field(None, description="e.g. rgb (x - 127) / 128")


class ProvenanceFilter(BaseModel):
    """Values per provenance field (``memory.filters``); a field left out is not filtered on."""

    model_config = _STRICT
    label_source: list[Literal[LABEL_SOURCES]] | None = Field(  # type: ignore[valid-type]
        None, min_length=1, description="human or teacher (pseudo-labelled)")
    source: list[NonEmpty] | None = Field(None, min_length=1, description="the items' source names")


class Query(BaseModel):
    model_config = _STRICT
    embeddings: list[list[float]] | None = Field(
        None, description="query embeddings, one row per query, any finite non-zero vectors of the memory's "
        "dimension (L2-normalised by the server); exactly one of embeddings and images",
        examples=[[[0.1, 0.7, 0.2]]])
    images: list[str] | None = Field(
        None, description="base64-encoded image files (PNG, JPEG, ...); needs a server started with --encoder")
    k: Whole = Field(10, description="neighbours per query, 1 to the server's max_k")
    probe_shards: PositiveWhole | None = Field(
        None, description="k-means memories: search only the P shards nearest each query (default: all)")
    probe_margin: float | None = Field(
        None, ge=0, le=2, description="k-means memories: visit a query's 2nd..P-th nearest shards (every shard "
        "without probe_shards) only where its similarity to them is within this margin (cosine) of the nearest's")
    encoder: EncoderDescription | None = Field(
        None, description="the encoder behind the embeddings: a mismatch with the memory's is refused (409)")
    include: ProvenanceFilter | None = Field(
        None, description="search only items whose provenance has one of these values per field given, e.g. "
        "{\"label_source\": [\"human\"]}; applied inside each shard, so k allowed neighbours come back",
        examples=[{"label_source": ["human"]}])
    exclude: ProvenanceFilter | None = Field(
        None, description="never return items whose provenance has one of these values, e.g. {\"source\": [\"web\"]}")


class ClassifyQuery(Query):
    k: Whole = Field(50, description="neighbours that vote, 1 to the server's max_k")
    method: Literal[tuple(voting.METHODS)] = Field("rank", description="voting rule")  # type: ignore[valid-type]
    # Bounded so that every weight and score stays a finite JSON number.
    alpha: float = Field(2.0, ge=1e-6, le=1e6, description="rank voting: w = 1 / (alpha + rank)")
    tau: float = Field(0.07, ge=1e-6, le=1e6, description="softmax voting temperature")
    xi: float = Field(1.0, ge=1e-6, le=1e6, description="distance voting exponent")
    ties: Literal[tuple(voting.TIES)] = Field(  # type: ignore[valid-type]
        "nearest", description="how a tied top score is settled: nearest (the tied class whose best-ranked "
        "neighbour is nearest wins) or leader (the paper's released code: the tied class that reached the top "
        "score first keeps it)")
    abstain_below: float | None = Field(
        None, ge=0.0, le=1.0, description="answer no label (label null, label_index -1, abstained true) when the "
        "voted class's share of the vote is below this confidence, a number in [0, 1] (default: always answer)")
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
    label: str | None = Field(None, description="predicted class name (left out when no neighbour could vote or "
                              "the query abstained)")
    label_index: int
    scores: dict[str, float] = Field(description="the voting rule's score per class")
    confidence: float = Field(description="the voted class's share of the vote: its score over the sum of every "
                                          "class's score (0 when no neighbour could vote)")
    abstained: bool = Field(description="true when the confidence was below abstain_below: no label is given")
    neighbours: list[Neighbour] | None = None


class ClassifyResponse(BaseModel):
    version: int
    method: str
    ties: str
    k: int
    results: list[Decision]


class Item(BaseModel):
    model_config = _STRICT
    id: str = Field(min_length=1, max_length=1024)
    embedding: list[float] = Field(description="any finite non-zero vector of the memory's dimension "
                                               "(L2-normalised by the server)")
    label: str = Field(description="class name; new names need class_names")
    source: str = ""
    uri: str = ""


class AddRequest(BaseModel):
    model_config = _STRICT
    items: list[Item] = Field(min_length=1, description="ids unique within the request")
    class_names: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="the memory's classes in order followed by new ones, when adding new classes")
    readmit: bool = Field(False, description="accept ids that were removed (unlearned) before")
    encoder: EncoderDescription | None = Field(
        None, description="the encoder behind the embeddings: a mismatch with the memory's is refused (409)")


class RemoveRequest(BaseModel):
    model_config = _STRICT
    ids: list[Annotated[str, Field(min_length=1)]] | None = Field(None, description="item ids to remove")
    label: str | None = Field(None, min_length=1, description="remove every item of this class")
    source: str | None = Field(None, min_length=1, description="remove every item from this source")
    reason: str | None = None


class StoredItem(BaseModel):
    """One live item of the served version (``GET /v1/items/{id}``)."""

    id: str
    version: int = Field(description="the version that answered")
    label: int
    label_name: str | None
    weight: float = Field(description="the item's vote multiplier (soft pruning; 1 unless pruned)")
    label_source: str | None = Field(description="human or teacher")
    confidence: float | None = Field(description="the teacher's probability of the label (1 for human labels)")
    source: str | None = Field(description="the data set the item came from")
    uri: str | None = Field(description="where its image came from (memory.uris)")
    has_image: bool = Field(description="the item names an image: GET /v1/items/{id}/image serves it if it "
                                        "can be read")
    embedding: list[float] = Field(description="the stored vector (decoded, unit norm), e.g. to classify the item")


class Health(BaseModel):
    status: Literal["ok"]
    version: int
    last_check_error: str | None = Field(description="why the last check for a newer version failed, if it did")
    last_lease_error: str | None = Field(description="why the last lease renewal failed, if it did")


class Info(BaseModel):
    memory: str
    version: int
    pinned: bool = Field(description="started with --version: serves that version only; admin changes are "
                                     "refused (409)")
    items: int
    removed_pending_compaction: int
    dim: int
    classes: list[str]
    backend: str
    shards: int
    encoder: dict = Field(description="the memory's encoder: name, version, image_size, preprocessing")
    serving_encoder: dict | None = Field(description="the encoder this server embeds images with (--encoder)")
    admin_enabled: bool
    limits: dict
    version_swaps: int
