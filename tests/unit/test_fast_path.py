"""Which requests the disclosure fast path answers, and that it hands on the rest intact."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from broker.disclosure.fast_path import PATH, DisclosureFastPath

VALID = orjson.dumps({"subject_ref": "PD-1", "category": "shelter", "purpose": "safety_planning"})


class Downstream:
    """The app behind the fast path (FastAPI's router in production): records what reaches it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _call(
    chunks: list[bytes],
    *,
    content_type: bytes | None = b"application/json",
    method: str = "POST",
    path: str = PATH,
    disconnect_after: int | None = None,
) -> tuple[Downstream, list[Message]]:
    downstream = Downstream()
    headers = [(b"content-type", content_type)] if content_type else []
    scope: Scope = {"type": "http", "method": method, "path": path, "headers": headers}
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    if disconnect_after is not None:
        messages = [*messages[:disconnect_after], {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await DisclosureFastPath(downstream)(scope, receive, send)
    return downstream, sent


def _status(sent: list[Message]) -> int:
    status: int = sent[0]["status"]
    return status


async def test_a_valid_request_is_answered_here() -> None:
    # No bearer token: the shared handler refuses with the documented 401, headers and all.
    downstream, sent = await _call([VALID[:10], VALID[10:]])
    assert downstream.bodies == []
    assert _status(sent) == 401
    headers = dict(sent[0]["headers"])
    assert headers[b"www-authenticate"] == b'Bearer error="invalid_token"'
    assert headers[b"content-type"] == b"application/problem+json"
    assert orjson.loads(sent[1]["body"])["status"] == 401


@pytest.mark.parametrize(
    ("chunks", "options"),
    [
        ([b'{"subject_ref": "PD-1"'], {}),  # bad JSON
        ([b'{"subject_ref": "PD-1", ', b'"category": 3, "purpose": "x"}'], {}),  # invalid field
        ([VALID[:7], VALID[7:]], {"content_type": b"application/vnd.example+json"}),
        ([VALID], {"content_type": None}),
        ([VALID], {"method": "PUT"}),
        ([VALID], {"path": PATH + "/"}),
    ],
    ids=["bad-json", "invalid-field", "other-json-type", "no-content-type", "put", "other-path"],
)
async def test_everything_else_reaches_the_route_whole(
    chunks: list[bytes], options: dict[str, Any]
) -> None:
    downstream, sent = await _call(chunks, **options)
    assert downstream.bodies == [b"".join(chunks)]
    assert _status(sent) == 299


async def test_a_client_gone_mid_body_gets_nothing_and_records_nothing() -> None:
    downstream, sent = await _call([VALID[:5], VALID[5:]], disconnect_after=1)
    assert downstream.bodies == [] and sent == []


def test_the_documented_route_depends_on_nothing_the_fast_path_would_skip() -> None:
    """The fast path calls ``serve_disclosure`` without FastAPI: a dependency added to
    the route, its router or the app would run for some requests and not others."""
    from fastapi.routing import APIRoute

    from broker.disclosure import endpoints
    from broker.disclosure.endpoints import router

    (route,) = [r for r in router.routes if isinstance(r, APIRoute) and r.path == PATH]
    assert route.methods == {"POST"}
    assert router.dependencies == [] and route.dependencies == []
    # The one dependency is the caller check, which serve_disclosure makes itself.
    assert [d.call for d in route.dependant.dependencies] == [endpoints._caller]
    assert [p.name for p in route.dependant.body_params] == ["body"]
    assert route.dependant.request_param_name == "request"
