"""Input checks shared by several domains."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from broker.errors import InvalidRequest


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
