"""A real webhook receiver on 127.0.0.1, reusing the records server's thread harness."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.records_server import RecordsServer


class WebhookServer(RecordsServer):
    """Collects deliveries; ``answer_status`` lets a test play a webhook that is down."""

    def __init__(self) -> None:
        super().__init__(path="/hook")
        self.deliveries: list[dict[str, Any]] = []
        self.answer_status = 204
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        self.deliveries.append(
            {"content_type": request.headers.get("content-type"), "body": body.decode()}
        )
        return Response(status_code=self.answer_status)
