"""Request and response schemas of the ranking endpoint (pydantic; they also make the OpenAPI docs)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# strict: no coercion (true is not the id 1, "5" is not 5); JSON's NaN / Infinity (Python reads them): 422
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
MAX_HISTORY = 1000
MAX_K = 1000
MAX_RANK_ITEMS = 1000
MAX_ID = 2**63 - 1  # ids are int64 in the index and the tables
MAX_SHOP_ID = 200
# an int id, or the shop's own id for catalogues prepared from a shop's files (serving/shop_ids.py)
Id = Annotated[int, Field(ge=0, le=MAX_ID)] | Annotated[str, Field(min_length=1, max_length=MAX_SHOP_ID)]


class Range(BaseModel):
    model_config = STRICT
    min: float | None = None
    max: float | None = None


# bool first: pydantic would otherwise turn a JSON true into 1, which matches no flag such as "cold"
Filter = Range | bool | str | int | float | list[bool | str | int]


class Context(BaseModel):
    model_config = STRICT
    hour: int | None = Field(None, ge=0, le=23, description="hour of day (UTC) of the request")


class QueryFields(BaseModel):
    model_config = STRICT
    user_id: Id | None = Field(None, description="a known user; their stored history is used")
    history: list[Id] | None = Field(None, max_length=MAX_HISTORY,
                                      description="item ids of the current session, oldest first")
    profile: dict[str, str | int | float] | None = Field(None, description="profile attributes, e.g. age")
    context: Context | None = None


class RecommendRequest(QueryFields):
    k: int = Field(10, ge=1, le=MAX_K)
    filters: dict[str, Filter] | None = Field(None, description='e.g. {"category": "shoes", "price": {"max": 50}}')
    exclude_seen: bool = True


class RankRequest(QueryFields):
    items: list[Id] = Field(..., min_length=1, max_length=MAX_RANK_ITEMS, description="candidate item ids")


class NewItem(BaseModel):
    model_config = STRICT
    item_id: Id
    title: str = Field(..., min_length=1, max_length=1000)
    text: str | None = Field(None, max_length=20000)
    image_base64: str | None = Field(None, description="the image file's bytes, base64-encoded")
    attributes: dict[str, Any] = Field(default_factory=dict)

    @field_validator("attributes")
    @classmethod
    def _finite(cls, attributes: dict) -> dict:
        def check(value, where: str) -> None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"attribute {where} is {value}; numbers must be finite")
            if isinstance(value, (list, dict)):
                for key, inner in (value.items() if isinstance(value, dict) else enumerate(value)):
                    check(inner, f"{where}.{key}")

        for name, value in attributes.items():
            check(value, name)
        return attributes


class ReloadRequest(BaseModel):
    model_config = STRICT
    artifacts: str | None = Field(None, description="folder to load; default: reload the current one")


class Reason(BaseModel):
    kind: str
    text: str
    because_of: int | str | None = None
    because_of_title: str | None = None
    similarity: float | None = None
    modality: str | None = None
    modality_similarity: dict[str, float] | None = None


class ScoredItem(BaseModel):
    item_id: int | str
    title: str
    score: float
    retrieval_score: float
    reason: Reason
    attributes: dict[str, Any] = Field(default_factory=dict, description="catalogue attributes, and `cold`")


class RecommendResponse(BaseModel):
    strategy: str = Field(..., description="history | profile | popularity")
    cold_start: bool
    items: list[ScoredItem]
    withdrawn_item_ids: list[int | str] | None = Field(None, description="/rank: candidates left out, withdrawn")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: `detail` says what was wrong; some add fields (`errors`, `unknown_item_ids`)."""
    model_config = ConfigDict(extra="allow")
    detail: str
