"""An FCM-HTTP-v1-like endpoint for the sandbox and the tests.

``POST /v1/projects/{project}/messages:send`` with ``Authorization: Bearer <token>``;
device tokens choose the answer: ``unregistered-…`` → 404 UNREGISTERED, ``invalid-…`` →
400 INVALID_ARGUMENT, ``unavailable-…`` → 503 UNAVAILABLE, anything else → 200 with a
message name. Every request is kept in ``requests``.
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def _error(status: int, name: str, code: str | None) -> JSONResponse:
    details = (
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
        if code
        else []
    )
    body = {"error": {"code": status, "message": name, "status": name, "details": details}}
    return JSONResponse(body, status)


class FcmSandbox:
    def __init__(self, bearer: str = "sandbox-oauth-token") -> None:
        self.bearer = bearer
        self.requests: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/projects/{project}/messages:send", self.send, methods=["POST"]),
            ]
        )

    def pending(self) -> int:
        return 0

    async def send(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.bearer}":
            return _error(401, "UNAUTHENTICATED", None)
        body = await request.json()
        message = body.get("message", {}) if isinstance(body, dict) else {}
        token = str(message.get("token", ""))
        self.requests.append(message)
        if token.startswith("unregistered-"):
            return _error(404, "NOT_FOUND", "UNREGISTERED")
        if token.startswith("invalid-") or not token:
            return _error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")
        if token.startswith("unavailable-"):
            return _error(503, "UNAVAILABLE", "UNAVAILABLE")
        project = request.path_params["project"]
        return JSONResponse({"name": f"projects/{project}/messages/{secrets.token_hex(8)}"})
