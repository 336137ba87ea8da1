"""Request and response schemas of the ranking endpoint (pydantic; they also make the OpenAPI docs)."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multimodal_rec.serving.errors import RequestError

# strict: no coercion (true is not the id 1, "5" is not 5); JSON's NaN / Infinity (Python reads them): 422
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
MAX_HISTORY = 1000
MAX_K = 1000
MAX_RANK_ITEMS = 1000
MAX_ID = 2**63 - 1  # ids are int64 in the index and the tables
MAX_SHOP_ID = 200
MAX_EVENTS = 1000  # a POST /events batch
MAX_EPOCH = 10**11  # epoch seconds: far beyond any shop's events, well inside a float's exact integers
MAX_DEPTH = 8  # the deepest a request nests: {"filters": {"price": {"min": 1}}} is 3
MAX_NUMBER = 2**64  # ints at or beyond it fit no column (float() of 10**400 even raises OverflowError)
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_VALUES = 1000  # a multi-valued attribute's list
MAX_ATTRIBUTE_CHARS = 10_000
# an int id, or the shop's own id for catalogues prepared from a shop's files (serving/shop_ids.py)
Id = Annotated[int, Field(ge=0, le=MAX_ID)] | Annotated[str, Field(min_length=1, max_length=MAX_SHOP_ID)]


def _where(path: tuple) -> str:
    """A path for an error message, printable whatever the keys hold."""
    return ".".join(ascii(p)[1:-1] if isinstance(p, str) and not _valid(p) else str(p) for p in path) or "body"


def _valid(text: str) -> bool:
    """False for a string with lone surrogates: it cannot be encoded, so every answer naming it was a 500."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_scalar(value: Any, path: tuple) -> None:
    if isinstance(value, str):
        if not _valid(value):
            raise ValueError(f"{_where(path)}: a string holds a lone surrogate; strings must be valid Unicode")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int) and abs(value) >= MAX_NUMBER:
        raise ValueError(f"{_where(path)}: a number beyond 64 bits")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{_where(path)}: numbers must be finite, got {value}")


def check_json(value: Any) -> None:
    """Refuses, naming the field, what the JSON parser lets through but nothing downstream handles: strings or
    keys with lone surrogates, nesting past MAX_DEPTH, ints past 64 bits, non-finite floats. Iterative (a deep
    body cannot exhaust the stack); paths are built only for the error."""
    stack = [(value, ())]
    while stack:
        value, path = stack.pop()
        if not isinstance(value, (dict, list)):
            _check_scalar(value, path)
            continue
        if len(path) >= MAX_DEPTH:
            raise ValueError(f"{_where(path)}: nested deeper than {MAX_DEPTH} levels")
        for key, inner in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and not _valid(key):
                raise ValueError(f"{_where((*path, key))}: a key holds a lone surrogate; keys must be valid Unicode")
            if isinstance(inner, (dict, list)):
                stack.append((inner, (*path, key)))
            elif inner is not None and not (type(inner) is int and -MAX_NUMBER < inner < MAX_NUMBER):
                _check_scalar(inner, (*path, key))


class Body(BaseModel):
    """A request body (or a part of one): checked with check_json before any field is validated, so that no
    field error can carry a surrogate into the answer either."""
    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _sound_json(cls, data: Any) -> Any:
        check_json(data)
        return data


class Range(Body):
    min: float | None = None
    max: float | None = None


# bool first: pydantic would otherwise turn a JSON true into 1, which matches no flag such as "cold"
Filter = Range | bool | str | int | float | list[bool | str | int]
Scalar = bool | str | int | float


# a time: ISO 8601 ("2026-12-07T10:00:00Z"; no zone means UTC) or epoch seconds
When = Annotated[str, Field(min_length=4, max_length=40)] | Annotated[float, Field(ge=0, le=MAX_EPOCH)]


def epoch_seconds(when: str | float | None, default: float) -> float:
    """A request's time as epoch seconds (a 422 for a string that is not ISO 8601)."""
    if when is None:
        return default
    if isinstance(when, (int, float)):
        return float(when)
    try:
        parsed = datetime.fromisoformat(when.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as error:
        raise RequestError(422, f"time {when[:40]!r} is not ISO 8601 (e.g. 2026-12-07T10:00:00Z) nor epoch "
                           "seconds") from error
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    seconds = parsed.timestamp()
    if not 0 <= seconds <= MAX_EPOCH:
        raise RequestError(422, f"time {when[:40]!r} is out of range")
    return seconds


class Context(Body):
    hour: int | None = Field(None, ge=0, le=23, description="hour of day (UTC) of the request")
    time: When | None = Field(None, description="the request's time (ISO 8601 or epoch seconds; default now): "
                                                "the online counts decay in event time, so a replay runs as it did")


class EventIn(Body):
    user_id: Id = Field(..., description="the shop's customer id; a new one is known from this event on")
    item_id: Id
    event: str = Field("event", min_length=1, max_length=50, description="e.g. view, cart, purchase")
    time: When | None = Field(None, description="when it happened (ISO 8601 or epoch seconds); default now")
    event_id: str | None = Field(None, min_length=1, max_length=200, description="makes a retry idempotent")


class EventBatch(Body):
    events: list[EventIn] = Field(..., min_length=1, max_length=MAX_EVENTS)


class QueryFields(Body):
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


class NewItem(Body):
    item_id: Id
    title: str = Field(..., min_length=1, max_length=1000)
    text: str | None = Field(None, max_length=20000)
    image_base64: str | None = Field(None, description="the image file's bytes, base64-encoded")
    attributes: dict[str, Scalar | list[Scalar] | None] = Field(
        default_factory=dict, description="catalogue columns: a string, number or boolean, or a list of those")

    @field_validator("attributes", mode="before")
    @classmethod
    def _flat(cls, attributes: Any) -> Any:
        """Attributes are catalogue columns: flat values, bounded, said in one line (the union's own errors
        would list every member)."""
        if not isinstance(attributes, dict):
            return attributes
        if len(attributes) > MAX_ATTRIBUTES:
            raise ValueError(f"{len(attributes)} attributes; at most {MAX_ATTRIBUTES}")
        for name, value in attributes.items():
            if len(name) > MAX_SHOP_ID:
                raise ValueError(f"an attribute name of {len(name)} characters; at most {MAX_SHOP_ID}")
            values = value if isinstance(value, list) else [value]
            if len(values) > MAX_ATTRIBUTE_VALUES:
                raise ValueError(f"attribute {name!r} holds {len(values)} values; at most {MAX_ATTRIBUTE_VALUES}")
            for inner in values:
                if isinstance(inner, (dict, list)):
                    what = "an object" if isinstance(inner, dict) else "a nested list"
                    raise ValueError(f"attribute {name!r} holds {what}; attributes are flat: strings, numbers, "
                                     "booleans or lists of those")
                if isinstance(inner, str) and len(inner) > MAX_ATTRIBUTE_CHARS:
                    raise ValueError(f"attribute {name!r} holds a string over {MAX_ATTRIBUTE_CHARS} characters")
        return attributes


class ReloadRequest(Body):
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
