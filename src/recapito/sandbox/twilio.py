"""A Twilio-compatible Messages API for the sandbox (127.0.0.1 only).

``POST /2010-04-01/Accounts/{sid}/Messages.json`` (Basic auth: account SID and auth token)
answers by magic numbers, and for accepted messages fires status callbacks signed with the
auth token (``X-Twilio-Signature``) in sequence after a short delay:

| To               | answer                                                    |
|------------------|-----------------------------------------------------------|
| +393400000002    | 400, 21211 invalid number                                 |
| +390612345678    | 400, 21614 not a mobile (landline)                        |
| +393400000003    | 400, 21610 blocked (the recipient replied STOP)           |
| +393400000004    | 201 queued → sent → undelivered 30003 (unreachable)      |
| +393400000005    | 503 (a soft error: the caller retries once, later)        |
| any other        | 201 queued → sent → delivered, then a late ``sent``       |

Every request is kept in ``requests`` (the tests count them: a retried sweep must never
POST twice).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from recapito.fallback.sms import sign
from recapito.sandbox import _proc

INVALID = "+393400000002"
LANDLINE = "+390612345678"
BLOCKED = "+393400000003"
UNREACHABLE = "+393400000004"
UNAVAILABLE = "+393400000005"

_ERRORS = {
    INVALID: (400, 21211, "The 'To' number is not a valid phone number."),
    LANDLINE: (400, 21614, "'To' number is not a valid mobile number"),
    BLOCKED: (400, 21610, "Attempt to send to unsubscribed recipient"),
    UNAVAILABLE: (503, 20503, "Service unavailable"),
}


@dataclass
class SentRecord:
    sid: str
    to: str
    body: str
    params: dict[str, str]
    callbacks: list[tuple[str, int]] = field(default_factory=list)  # (status, http code)


class TwilioSandbox:
    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "sandbox-token",
        *,
        delay: float = 0.05,
        late_sent: bool = True,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.delay = delay
        self.late_sent = late_sent
        self.requests: list[SentRecord] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.app = Starlette(
            routes=[
                Route("/2010-04-01/Accounts/{sid}/Messages.json", self.create, methods=["POST"]),
            ]
        )

    def _authorised(self, request: Request, sid: str) -> bool:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic ") or sid != self.account_sid:
            return False
        try:
            user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.account_sid and secrets.compare_digest(pw, self.auth_token)

    async def create(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        if not self._authorised(request, sid):
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, 401)
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        to = form.get("To", "")
        msid = "SM" + secrets.token_hex(16)
        record = SentRecord(msid, to, form.get("Body", ""), form)
        self.requests.append(record)
        if to in _ERRORS:
            status, code, message = _ERRORS[to]
            body = {"code": code, "message": message, "more_info": "", "status": status}
            return JSONResponse(body, status)
        callback = form.get("StatusCallback")
        if callback:
            seq = ["sent", "undelivered"] if to == UNREACHABLE else ["sent", "delivered"]
            if self.late_sent and to != UNREACHABLE:
                seq.append("sent")
            task = asyncio.create_task(self._callbacks(record, callback, seq))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return JSONResponse(
            {
                "sid": msid,
                "account_sid": self.account_sid,
                "to": to,
                "from": form.get("From"),
                "body": record.body,
                "status": "queued",
                "num_segments": "1",
                "error_code": None,
                "error_message": None,
                "api_version": "2010-04-01",
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{msid}.json",
            },
            201,
        )

    async def _callbacks(self, record: SentRecord, url: str, seq: list[str]) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            for status in seq:
                await asyncio.sleep(self.delay)
                params = {
                    "AccountSid": self.account_sid,
                    "ApiVersion": "2010-04-01",
                    "From": record.params.get("From", ""),
                    "To": record.to,
                    "MessageSid": record.sid,
                    "SmsSid": record.sid,
                    "MessageStatus": status,
                    "SmsStatus": status,
                }
                if status == "undelivered":
                    params["ErrorCode"] = "30003"
                headers = {"X-Twilio-Signature": sign(self.auth_token, url, params)}
                try:
                    resp = await client.post(url, data=params, headers=headers)
                    record.callbacks.append((status, resp.status_code))
                except httpx.HTTPError:
                    record.callbacks.append((status, 0))

    def pending(self) -> int:
        return len(self.tasks)


class _Served(Protocol):
    app: Starlette

    def pending(self) -> int: ...


class TwilioSandboxServer:
    """A sandbox API (Twilio's, or the FCM-like one) in a background thread (uvicorn on
    127.0.0.1, port chosen)."""

    def __init__(self, sandbox: _Served, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = sandbox
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            sandbox.app,
            host=host,
            port=self.port,
            access_log=False,
            log_level="warning",
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="twilio-sandbox", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 10.0) -> TwilioSandboxServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Twilio sandbox did not start")
            time.sleep(0.02)
        return self

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until every callback sequence has been fired."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sandbox.pending():
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


# ---- as a child process of the sandbox (recapito.sandbox.runtime) ---------------------------


@dataclass(frozen=True)
class TwilioProcessSpec:
    address: str
    port: int
    parent_pid: int
    account_sid: str
    auth_token: str
    delay: float = 0.5

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TwilioProcessSpec:
        return cls(**json.loads(text))


async def serve(spec: TwilioProcessSpec) -> int:
    """Serve until SIGTERM/SIGINT (uvicorn's handlers) or until the parent process exits."""
    sandbox = TwilioSandbox(spec.account_sid, spec.auth_token, delay=spec.delay)
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.address, spec.port))
    except OSError as exc:
        _proc.report(_proc.listen_error("Twilio API", spec.address, spec.port, exc))
        return 1
    config = uvicorn.Config(sandbox.app, access_log=False, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            _proc.report(f"{_proc.ERROR} Twilio API: the server stopped while starting")
            return 1
        await asyncio.sleep(0.02)
    _proc.report(_proc.READY)
    stop = asyncio.Event()
    watchdog = asyncio.create_task(_proc.watch_parent(spec.parent_pid, stop))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    watchdog.cancel()
    stopped.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m recapito.sandbox.twilio '<spec json>'", file=sys.stderr)
        return 2
    _proc.configure_logging("twilio")
    return asyncio.run(serve(TwilioProcessSpec.from_json(_proc.spec_text(args[0]))))


def describe() -> dict[str, Any]:
    return {
        "invalid": INVALID,
        "landline": LANDLINE,
        "blocked": BLOCKED,
        "unreachable": UNREACHABLE,
        "unavailable": UNAVAILABLE,
    }


if __name__ == "__main__":
    sys.exit(main())
