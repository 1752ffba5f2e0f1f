"""The tracking service (ASGI, Starlette on uvicorn): ``recapito tracking serve``.

- ``GET|HEAD /o/{token}``: the 1x1 open pixel (GIF, never cached), the hit recorded;
- ``GET|HEAD /c/{token}``: ``302`` to the URL bound in the token, the hit recorded;
- ``GET /u/{token}``: a confirmation page with a button; it never unsubscribes by itself
  (security scanners and link previews follow GETs);
- ``POST /u/{token}`` with ``List-Unsubscribe=One-Click`` (RFC 8058, sent by mail clients
  and by the page's button): the address is suppressed at once;
- ``GET /healthz``.

A token that does not verify answers 404, a request too large 413 or 400, quickly and
without a traceback. A hit is recorded with the user agent, the IP prefix (/24 or /48,
never the address) and the delay since the message was accepted, and classified (human,
machine open, scanner click; ``recapito.tracking.classify``). When the ledger cannot be
written the pixel and the redirect are served all the same (the reader comes first).

Client addresses: behind a reverse proxy, uvicorn takes ``X-Forwarded-For`` from the
proxies named in ``--forwarded-allow-ips`` (default 127.0.0.1 only). The access log is off:
it would write full addresses.
"""

from __future__ import annotations

import asyncio
import base64
import html
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from recapito.fallback.callbacks import TwilioHook
from recapito.ledger.store import utcnow
from recapito.tracking.classify import DEFAULT_SCANNER_WINDOW, classify_click, classify_open
from recapito.tracking.classify import ip_prefix as prefix_of
from recapito.tracking.store import DeliveryFacts, Hit, TrackingStore
from recapito.tracking.tokens import TokenError, TokenSigner

log = logging.getLogger("recapito.tracking")

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
MAX_PATH = 4096
MAX_BODY = 8192
_NO_CACHE = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "0",
}
_PAGE_HEADERS = {
    **_NO_CACHE,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _not_found() -> Response:
    return PlainTextResponse("not found\n", status_code=404, headers=_NO_CACHE)


def _client(request: Request) -> tuple[str, str | None]:
    agent = request.headers.get("user-agent", "")[:400]
    host = request.client.host if request.client else None
    return agent, host


def _delay(facts: DeliveryFacts, now: datetime) -> float | None:
    if facts.accepted_at is None:
        return None
    return max(0.0, (now - facts.accepted_at).total_seconds())


def _mask(address: str) -> str:
    local, _, domain = address.partition("@")
    shown = local[:1] + "•" * max(2, min(6, len(local) - 1))
    return f"{shown}@{domain}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; background: #f2f4f7; color: #1d2939;
       margin: 0; padding: 48px 16px; }}
main {{ max-width: 480px; margin: 0 auto; background: #fff; padding: 32px; border-radius: 6px; }}
button {{ background: #0b3d91; color: #fff; border: 0; padding: 12px 22px; font-size: 16px;
         border-radius: 4px; cursor: pointer; }}
</style></head>
<body><main>
<h1>{title}</h1>
{body}
</main></body></html>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=html.escape(title), body=body), status_code=status, headers=_PAGE_HEADERS
    )


class TrackingApp:
    """The ASGI application; ``scanner_window`` is the "too fast to be a person" delay."""

    def __init__(
        self,
        store: TrackingStore,
        signer: TokenSigner,
        *,
        scanner_window: float = DEFAULT_SCANNER_WINDOW,
        twilio: TwilioHook | None = None,
    ) -> None:
        self.store = store
        self.twilio = twilio
        self.signer = signer
        self.scanner_window = scanner_window
        self.app = Starlette(
            routes=[
                Route("/o/{token}", self.open, methods=["GET", "HEAD"]),
                Route("/c/{token}", self.click, methods=["GET", "HEAD"]),
                Route("/u/{token}", self.unsubscribe, methods=["GET", "POST"]),
                Route("/healthz", self.health, methods=["GET"]),
                Route("/twilio/status", self.twilio_status, methods=["POST"]),
                Route("/twilio/inbound", self.twilio_inbound, methods=["POST"]),
            ],
            exception_handlers={404: self._404, 405: self._405, 500: self._500},
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(scope.get("raw_path") or scope["path"]) > MAX_PATH:
            await PlainTextResponse("request too large\n", status_code=414)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _404(self, request: Request, exc: Exception) -> Response:
        return _not_found()

    async def _405(self, request: Request, exc: Exception) -> Response:
        return PlainTextResponse("method not allowed\n", status_code=405)

    async def _500(self, request: Request, exc: Exception) -> Response:
        log.warning("tracking: %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return PlainTextResponse("temporarily unavailable\n", status_code=503)

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def _facts(self, delivery_id: int) -> DeliveryFacts | None:
        try:
            return await run_in_threadpool(self.store.delivery, delivery_id)
        except Exception as exc:  # the ledger is down: serve the reader anyway
            log.warning("tracking: ledger unavailable (%s)", type(exc).__name__)
            return None

    async def _record(self, hit: Hit) -> None:
        try:
            await run_in_threadpool(self.store.record, hit)
        except Exception as exc:
            log.warning("tracking: hit not recorded (%s)", type(exc).__name__)

    async def open(self, request: Request) -> Response:
        try:
            delivery_id = self.signer.verify_open(request.path_params["token"])
        except TokenError:
            return _not_found()
        facts = await self._facts(delivery_id)
        if facts is not None:
            agent, host = _client(request)
            delay = _delay(facts, utcnow())
            verdict = classify_open(agent, host, delay, scanner_window=self.scanner_window)
            await self._record(
                Hit(
                    facts,
                    "open",
                    verdict.klass,
                    verdict.reason,
                    request.method,
                    agent,
                    prefix_of(host),
                    delay,
                )
            )
        return Response(PIXEL, media_type="image/gif", headers=_NO_CACHE)

    async def click(self, request: Request) -> Response:
        try:
            target = self.signer.verify_click(request.path_params["token"])
        except TokenError:
            return _not_found()
        facts = await self._facts(target.delivery_id)
        if facts is not None:
            agent, host = _client(request)
            delay = _delay(facts, utcnow())
            verdict = classify_click(
                request.method, agent, delay, scanner_window=self.scanner_window
            )
            await self._record(
                Hit(
                    facts,
                    "click",
                    verdict.klass,
                    verdict.reason,
                    request.method,
                    agent,
                    prefix_of(host),
                    delay,
                    link_index=target.index,
                    target=target.url,
                )
            )
        return RedirectResponse(
            target.url, status_code=302, headers={**_NO_CACHE, "Referrer-Policy": "no-referrer"}
        )

    async def unsubscribe(self, request: Request) -> Response:
        token = request.path_params["token"]
        try:
            delivery_id = self.signer.verify_unsubscribe(token)
        except TokenError:
            return _not_found()
        try:
            facts = await run_in_threadpool(self.store.delivery, delivery_id)
        except Exception as exc:
            log.warning("tracking: ledger unavailable (%s)", type(exc).__name__)
            return _page("Please try again", "<p>The service is busy. Try again later.</p>", 503)
        if facts is None:
            return _not_found()
        if request.method == "GET":
            return _page(
                "Unsubscribe",
                f"<p>Stop these messages to <strong>{html.escape(_mask(facts.address))}"
                "</strong>?</p>\n"
                '<form method="post" action="">\n'
                '<input type="hidden" name="List-Unsubscribe" value="One-Click">\n'
                '<button type="submit" id="unsubscribe">Unsubscribe</button>\n'
                "</form>",
            )
        body = await _read_body(request)
        if body is None:
            return PlainTextResponse("request too large\n", status_code=413)
        if not _one_click(request.headers.get("content-type", ""), body):
            return PlainTextResponse(
                "expected List-Unsubscribe=One-Click (RFC 8058)\n", status_code=400
            )
        agent, host = _client(request)
        data = {
            "method": "POST",
            "user_agent": agent,
            "ip_prefix": prefix_of(host),
            "delay_s": _delay(facts, utcnow()),
        }
        try:
            await run_in_threadpool(self.store.unsubscribe, facts, data)
        except Exception as exc:
            log.warning("tracking: unsubscribe not recorded (%s)", type(exc).__name__)
            return _page("Please try again", "<p>The service is busy. Try again later.</p>", 503)
        return _page(
            "Unsubscribed",
            f'<p id="done">{html.escape(_mask(facts.address))} will receive no more of '
            "these messages.</p>",
        )

    async def _twilio(self, request: Request, path: str, inbound: bool) -> Response:
        """Twilio webhooks: signature checked first (forged → 403), then applied."""
        hook = self.twilio
        if hook is None:
            return _not_found()
        body = await _read_body(request)
        if body is None:
            return PlainTextResponse("request too large\n", status_code=413)
        params = {
            k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()
        }
        url = hook.url_for(path, str(request.url))
        if not hook.verify(url, params, request.headers.get("x-twilio-signature", "")):
            return PlainTextResponse("forbidden\n", status_code=403)
        if inbound:
            result = await run_in_threadpool(hook.inbound, params)
        else:
            ref = request.query_params.get("ref")
            result = await run_in_threadpool(hook.status, params, ref)
        if result == "malformed":
            return PlainTextResponse("malformed\n", status_code=400)
        return Response(status_code=204)

    async def twilio_status(self, request: Request) -> Response:
        return await self._twilio(request, "/twilio/status", inbound=False)

    async def twilio_inbound(self, request: Request) -> Response:
        return await self._twilio(request, "/twilio/inbound", inbound=True)


async def _read_body(request: Request) -> bytes | None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return body


def _one_click(content_type: str, body: bytes) -> bool:
    if content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
        values = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        return "One-Click" in values.get("List-Unsubscribe", [])
    # multipart/form-data (allowed by RFC 8058) or no type: the field and its value
    return b"List-Unsubscribe" in body and b"One-Click" in body


# ---- running it ---------------------------------------------------------------------------


def uvicorn_config(
    app: TrackingApp, host: str, port: int, forwarded_allow_ips: str = "127.0.0.1"
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,  # would log full client addresses and tokens
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
        h11_max_incomplete_event_size=16 * 1024,
        timeout_keep_alive=5,
        lifespan="off",
    )


class ServiceThread:
    """The tracking service in a background thread (the demo and the tests)."""

    def __init__(self, app: TrackingApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port))
        self.thread = threading.Thread(target=self._run, name="tracking-service", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self, timeout: float = 10.0) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the tracking service did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextmanager
def running(app: TrackingApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[ServiceThread]:
    service = ServiceThread(app, host, port).start()
    try:
        yield service
    finally:
        service.stop()
