"""A simulated audience for the sandbox: people, Apple Mail Privacy Protection, image
proxies and security scanners reading the messages the sandbox MX servers stored.

For each stored message of a campaign (a deterministic draw per delivery):

- Apple MPP: the pixel fetched from an Apple proxy address (17.0.0.0/8, user agent
  ``Mozilla/5.0``) — some of those readers then click a link themselves;
- Gmail's image proxy fetches the pixel (``GoogleImageProxy``);
- a security gateway checks every link: ``HEAD`` requests with a scanner's user agent;
- a person opens it in a mail client (and some click a link), after the scanner window;
- nobody reads it.

Addresses are only sent as ``X-Forwarded-For`` values to the local tracking service (which
trusts 127.0.0.1 as a proxy); every request goes to the service's loopback address.
"""

from __future__ import annotations

import email
import hashlib
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from email.policy import compat32
from pathlib import Path

import httpx

from recapito.sandbox.maildir import iter_maildirs

_PIXEL = re.compile(r'src="(https?://[^"]+/o/[^"]+)"')
_CLICK = re.compile(r'href="(https?://[^"]+/c/[^"]+)"')

APPLE_MPP_AGENT = "Mozilla/5.0"
GOOGLE_PROXY_AGENT = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
SCANNER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/42.0.2311.135 Safari/537.36 Edge/12.246",
    "Barracuda Sentinel (EE)",
    "python-requests/2.31.0",
)
HUMAN_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Thunderbird/128.3.0",
    "Microsoft Outlook 16.0.17928; Pro",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148",
)
HUMAN_BROWSER = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)

# share of messages for each behaviour (the rest is never read)
MIX = (("apple_mpp", 0.25), ("google_proxy", 0.10), ("scanner", 0.12), ("human", 0.30))


@dataclass(frozen=True)
class StoredLinks:
    delivery_id: str
    pixel: str | None
    clicks: tuple[str, ...]
    stored_at: float


@dataclass
class ReaderReport:
    messages: int = 0
    behaviours: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    errors: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "behaviours": dict(self.behaviours),
            "requests": dict(self.requests),
            "errors": self.errors,
        }


def _html_part(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
    return ""


def stored_links(maildir_root: Path, campaign: str) -> list[StoredLinks]:
    """The pixel and click URLs of every stored message of ``campaign``."""
    found = []
    for stored in iter_maildirs(maildir_root):
        if stored.header("X-Recapito-Campaign") != campaign or stored.delivery_id is None:
            continue
        message = email.message_from_bytes(stored.read_bytes(), policy=compat32)
        html = _html_part(message)
        pixel = _PIXEL.search(html)
        found.append(
            StoredLinks(
                stored.delivery_id,
                pixel.group(1) if pixel else None,
                tuple(dict.fromkeys(m.group(1) for m in _CLICK.finditer(html))),
                stored.path.stat().st_mtime,
            )
        )
    return found


def _draw(seed: int, delivery_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{seed}:{salt}:{delivery_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def behaviour_of(seed: int, delivery_id: str) -> str:
    roll, edge = _draw(seed, delivery_id, "who"), 0.0
    for name, share in MIX:
        edge += share
        if roll < edge:
            return name
    return "unread"


def simulate_readers(
    maildir_root: Path,
    campaign: str,
    *,
    seed: int = 7,
    human_after: float = 0.0,
    workers: int = 8,
    timeout: float = 10.0,
) -> ReaderReport:
    """Read the campaign's stored messages as the audience would; people act only once
    ``human_after`` seconds have passed since each message was stored."""
    report = ReaderReport()
    machine: list[tuple[str, str, str, dict[str, str]]] = []  # (kind, method, url, headers)
    people: list[tuple[str, str, str, dict[str, str]]] = []
    latest = 0.0
    for n, links in enumerate(stored_links(maildir_root, campaign)):
        report.messages += 1
        who = behaviour_of(seed, links.delivery_id)
        report.behaviours[who] += 1
        person_ip = f"198.51.100.{n % 250 + 1}"
        if who == "apple_mpp" and links.pixel:
            apple = {"User-Agent": APPLE_MPP_AGENT, "X-Forwarded-For": f"17.58.{n % 250}.7"}
            machine.append(("open", "GET", links.pixel, apple))
            if links.clicks and _draw(seed, links.delivery_id, "click") < 0.35:
                agent = HUMAN_AGENTS[2]
                people.append(
                    (
                        "click",
                        "GET",
                        links.clicks[0],
                        {"User-Agent": agent, "X-Forwarded-For": person_ip},
                    )
                )
                latest = max(latest, links.stored_at)
        elif who == "google_proxy" and links.pixel:
            proxy = {"User-Agent": GOOGLE_PROXY_AGENT, "X-Forwarded-For": f"66.249.{n % 250}.9"}
            machine.append(("open", "GET", links.pixel, proxy))
        elif who == "scanner":
            agent = SCANNER_AGENTS[n % len(SCANNER_AGENTS)]
            gateway = {"User-Agent": agent, "X-Forwarded-For": f"203.0.113.{n % 250 + 1}"}
            for url in links.clicks:
                machine.append(("click", "HEAD", url, gateway))
        elif who == "human" and links.pixel:
            headers = {
                "User-Agent": HUMAN_AGENTS[n % len(HUMAN_AGENTS)],
                "X-Forwarded-For": person_ip,
            }
            people.append(("open", "GET", links.pixel, headers))
            if links.clicks and _draw(seed, links.delivery_id, "click") < 0.4:
                browser = {"User-Agent": HUMAN_BROWSER, "X-Forwarded-For": person_ip}
                people.append(("click", "GET", links.clicks[0], browser))
            latest = max(latest, links.stored_at)

    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:

        def fetch(item: tuple[str, str, str, dict[str, str]]) -> tuple[str, bool]:
            kind, method, url, headers = item
            try:
                response = client.request(method, url, headers=headers)
            except httpx.HTTPError:
                return kind, False
            return kind, response.status_code in (200, 302)

        def run(items: list[tuple[str, str, str, dict[str, str]]], label: str) -> None:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for kind, ok in pool.map(fetch, items):
                    if ok:
                        report.requests[f"{label}_{kind}"] += 1
                    else:
                        report.errors += 1

        run(machine, "machine")
        wait = latest + human_after - time.time()
        if people and wait > 0:
            time.sleep(min(wait, human_after))
        run(people, "human")
    return report
