"""Input checks shared by several domains."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, model_validator

from broker.errors import InvalidRequest


def has_nul(value: object) -> bool:
    """Whether a NUL character hides in ``value``'s strings (keys included)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the instant falls outside the years 1 to 9999 in UTC") from None


#: An instant with a time zone, taken to UTC; one outside years 1-9999 in UTC is refused
#: (``0001-01-01T00:00+01:00`` is a valid ISO 8601 text, but no storable instant).
UTCInstant = Annotated[AwareDatetime, AfterValidator(_in_utc)]


def utc_instant(value: datetime, *, what: str) -> datetime:
    """A query parameter's instant in UTC, or a 422 that says what is wrong with it."""
    if value.tzinfo is None:
        raise InvalidRequest(f"{what} needs a time zone (e.g. 2026-01-01T00:00:00Z).")
    try:
        return _in_utc(value)
    except ValueError:
        raise InvalidRequest(f"{what} falls outside the years 1 to 9999 in UTC.") from None


class RequestBody(BaseModel):
    """Base of every JSON request body: unknown members are refused, and so is a NUL
    character anywhere in it. PostgreSQL text cannot hold one (SQLite can), so the
    same body is refused alike on both, with a 422 that names the problem.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if has_nul(data):
            raise ValueError("text must not contain NUL characters (U+0000)")
        return data


def check_endpoint_url(url: str | None, *, what: str, allow_plain_http: bool) -> str | None:
    """Only absolute http(s) URLs without credentials or fragments are accepted."""
    if url is None:
        return None
    if len(url) > 2048:
        raise InvalidRequest(f"{what} is longer than 2048 characters.")
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise InvalidRequest(f"{what} must be an absolute https:// URL.")
    if parts.scheme == "http" and not allow_plain_http:
        raise InvalidRequest(f"{what} must use https://.")
    if parts.username or parts.password:
        raise InvalidRequest(f"{what} must not carry credentials.")
    if parts.fragment:
        raise InvalidRequest(f"{what} must not have a fragment.")
    host = parts.hostname
    try:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified or ip.is_multicast:
            raise InvalidRequest(f"{what} points at an unusable address.")
    except ValueError:
        pass
    return url


def printable(value: str, *, what: str, max_len: int) -> str:
    value = value.strip()
    if not value or len(value) > max_len:
        raise InvalidRequest(f"{what} must be 1 to {max_len} characters.")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidRequest(f"{what} must not contain control characters.")
    return value
