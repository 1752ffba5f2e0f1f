"""Who fetched a pixel or followed a link: a person, or a machine acting for one.

Opens (pixel fetches):

- ``machine`` when a mail provider fetched it, not a reader: Apple Mail Privacy Protection
  prefetches every remote image when the message reaches the device, through Apple's
  proxies (addresses in Apple's 17.0.0.0/8, user agent exactly ``Mozilla/5.0``); Google's
  (``GoogleImageProxy``), Yahoo's (``YahooMailProxy``) and Microsoft's image proxies;
  known security scanners; or any fetch within the scanner window after delivery.
- ``human`` otherwise.

Clicks:

- ``scanner`` for security gateways that follow every link of a message: ``HEAD``
  requests, known agents (Barracuda, Mimecast, Proofpoint, Microsoft Safe Links' old Edge
  signature, HTTP libraries such as python-requests, curl, Go, Java…), or a click within
  the scanner window after delivery (people do not click within seconds);
- ``human`` otherwise.

The reason (e.g. ``apple_mpp``, ``head_request``) is stored with the hit, so analysts can
see why a hit was set aside and re-judge it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

HUMAN = "human"
MACHINE = "machine"
SCANNER = "scanner"

DEFAULT_SCANNER_WINDOW = 10.0  # seconds after delivery

_APPLE_NETS = (ipaddress.ip_network("17.0.0.0/8"),)
_APPLE_MPP_AGENT = "mozilla/5.0"

# (substring of the lowercased user agent, reason)
_PROXY_AGENTS = (
    ("googleimageproxy", "google_image_proxy"),
    ("ggpht.com", "google_image_proxy"),
    ("yahoomailproxy", "yahoo_mail_proxy"),
    ("outlookimageproxy", "outlook_image_proxy"),
    ("microsoft office", "outlook_image_proxy"),
    ("edge/12.246", "microsoft_safe_links"),
)
_SCANNER_AGENTS = (
    ("barracuda", "barracuda"),
    ("mimecast", "mimecast"),
    ("proofpoint", "proofpoint"),
    ("edge/12.246", "microsoft_safe_links"),
    ("safelinks", "microsoft_safe_links"),
    ("forcepoint", "forcepoint"),
    ("symantec", "symantec"),
    ("trend micro", "trend_micro"),
    ("ironport", "cisco_ironport"),
    ("sophos", "sophos"),
    ("fortiguard", "fortinet"),
    ("python-requests", "http_library"),
    ("python-urllib", "http_library"),
    ("python-httpx", "http_library"),
    ("aiohttp", "http_library"),
    ("curl/", "http_library"),
    ("wget/", "http_library"),
    ("go-http-client", "http_library"),
    ("java/", "http_library"),
    ("okhttp", "http_library"),
    ("libwww-perl", "http_library"),
    ("headlesschrome", "headless_browser"),
    ("bot", "bot"),
    ("crawler", "bot"),
    ("spider", "bot"),
    ("scanner", "bot"),
)


@dataclass(frozen=True)
class Verdict:
    klass: str  # human | machine | scanner
    reason: str


def _in(nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in nets)


def classify_open(
    user_agent: str,
    ip: str | None,
    delay: float | None,
    *,
    scanner_window: float = DEFAULT_SCANNER_WINDOW,
) -> Verdict:
    ua = user_agent.strip().lower()
    if _in(_APPLE_NETS, ip) or ua == _APPLE_MPP_AGENT:
        return Verdict(MACHINE, "apple_mpp")
    for needle, reason in _PROXY_AGENTS:
        if needle in ua:
            return Verdict(MACHINE, reason)
    for needle, reason in _SCANNER_AGENTS:
        if needle in ua:
            return Verdict(MACHINE, reason)
    if not ua:
        return Verdict(MACHINE, "no_user_agent")
    if delay is not None and delay < scanner_window:
        return Verdict(MACHINE, "too_fast")
    return Verdict(HUMAN, "")


def classify_click(
    method: str,
    user_agent: str,
    delay: float | None,
    *,
    scanner_window: float = DEFAULT_SCANNER_WINDOW,
) -> Verdict:
    if method.upper() == "HEAD":
        return Verdict(SCANNER, "head_request")
    ua = user_agent.strip().lower()
    for needle, reason in _SCANNER_AGENTS:
        if needle in ua:
            return Verdict(SCANNER, reason)
    if not ua:
        return Verdict(SCANNER, "no_user_agent")
    if delay is not None and delay < scanner_window:
        return Verdict(SCANNER, "too_fast")
    return Verdict(HUMAN, "")


def ip_prefix(ip: str | None) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) network of an address: never the full address."""
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))
