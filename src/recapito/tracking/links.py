"""Link rewriting, the open pixel and the unsubscribe headers of one campaign message.

``Tracker.transform(delivery_id, enabled)`` is the hook the template renderer runs on the
rendered HTML and text bodies:

- every ``http(s)`` link of the HTML (``<a>`` and ``<area>`` ``href``) becomes
  ``{base}/c/{token}``; ``mailto:``, ``tel:``, anchors (``#…``), links already pointing
  at the tracking service (the unsubscribe link among them) and links marked
  ``data-notrack`` stay as they are;
- the same URLs in the text part get the same click URLs (same link index);
- a 1x1 open pixel ``{base}/o/{token}`` goes right before ``</body>``.

With tracking off (campaign parameter, or the contact's ``tracking`` column false) the
bodies are left alone; the ``List-Unsubscribe`` headers are always there (compliance, not
tracking).
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from recapito.tracking.tokens import MAX_TARGET_LENGTH, TokenSigner

_TAG = re.compile(r"<(?:a|area)\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\shref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s>"']+))""", re.IGNORECASE)
_NOTRACK = re.compile(r"\sdata-notrack\b", re.IGNORECASE)
# case-sensitive: a literal prefix lets the regex engine skip ahead (an IGNORECASE scan is
# 5-10 times slower on a text part); upper-case URLs in a text part stay untracked
_TEXT_URL = re.compile(r"""https?://[^\s<>"'()\[\]{}]+""")
_TRAILING = ".,;:!?"
_SPACE = re.compile(r"\s")  # one C scan, not a generator over every character
_BODY_END = "</body>"

# values of a contact's ``tracking`` column that switch tracking off for that contact
TRACKING_COLUMN = "tracking"
_OFF = frozenset({"false", "0", "no", "n", "off", "f", "nein", "non", "falso"})


def contact_allows_tracking(row: Mapping[str, Any]) -> bool:
    """False when the contact's ``tracking`` column says no (false, 0, no, off…)."""
    value = row.get(TRACKING_COLUMN)
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return str(value).strip().lower() not in _OFF


@dataclass(frozen=True)
class Tracker:
    """Tracking URLs of one campaign: ``base_url`` of the tracking service (None: no
    tracking, and unsubscribe by mailto: only) and the domain of the mailto: form."""

    signer: TokenSigner
    base_url: str | None
    mailto_domain: str

    # ---- unsubscribe ------------------------------------------------------------------

    def unsubscribe_url(self, delivery_id: int) -> str | None:
        if self.base_url is None:
            return None
        return f"{self.base_url}/u/{self.signer.unsubscribe_token(delivery_id)}"

    def unsubscribe_mailto(self, delivery_id: int) -> str:
        token = self.signer.unsubscribe_token(delivery_id)
        return f"mailto:unsubscribe+{token}@{self.mailto_domain}?subject=unsubscribe"

    def headers(self, delivery_id: int) -> dict[str, str]:
        """``List-Unsubscribe`` (https and mailto:) and, with an https URL,
        ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058)."""
        url = self.unsubscribe_url(delivery_id)
        mailto = self.unsubscribe_mailto(delivery_id)
        if url is None:
            return {"List-Unsubscribe": f"<{mailto}>"}
        return {
            "List-Unsubscribe": f"<{url}>, <{mailto}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }

    def body_link(self, delivery_id: int) -> str:
        """The unsubscribe link for the message body (``{{ unsubscribe_url }}``)."""
        return self.unsubscribe_url(delivery_id) or self.unsubscribe_mailto(delivery_id)

    # ---- links and pixel --------------------------------------------------------------

    def _trackable(self, url: str) -> bool:
        low = url[:8].lower()
        if not (low.startswith("https://") or low.startswith("http://")):
            return False
        if len(url) > MAX_TARGET_LENGTH or _SPACE.search(url):
            return False
        return not (self.base_url is not None and url.startswith(self.base_url + "/"))

    def rewrite(self, html: str, text: str, delivery_id: int) -> tuple[str, str]:
        """The bodies with tracked links and the open pixel (no change without a base)."""
        base = self.base_url
        if base is None:
            return html, text
        signer = self.signer
        index_of: dict[str, int] = {}
        click_url: dict[str, str] = {}

        def tracked(url: str) -> str:
            found = click_url.get(url)
            if found is None:
                index = index_of.setdefault(url, len(index_of))
                found = f"{base}/c/{signer.click_token(delivery_id, index, url)}"
                click_url[url] = found
            return found

        def tag(match: re.Match[str]) -> str:
            whole = match.group(0)
            if _NOTRACK.search(whole):
                return whole
            href = _HREF.search(whole)
            if href is None:
                return whole
            raw = next(g for g in href.groups()[1:] if g is not None)
            url = html_lib.unescape(raw).strip()
            if not self._trackable(url):
                return whole
            start, end = href.span()
            return f'{whole[:start]}{href.group(1)}"{tracked(url)}"{whole[end:]}'

        def text_url(match: re.Match[str]) -> str:
            url = match.group(0)
            stripped = url.rstrip(_TRAILING)
            if not self._trackable(stripped):
                return url
            return tracked(stripped) + url[len(stripped) :]

        html = _TAG.sub(tag, html)
        text = _TEXT_URL.sub(text_url, text)
        pixel = (
            f'<img src="{base}/o/{signer.open_token(delivery_id)}" width="1" height="1" '
            'alt="" border="0" style="display:block;width:1px;height:1px;border:0" />'
        )
        end = html.lower().rfind(_BODY_END)
        html = html + pixel if end < 0 else f"{html[:end]}{pixel}\n{html[end:]}"
        return html, text

    def transform(
        self, delivery_id: int, enabled: bool = True
    ) -> Callable[[str, str], tuple[str, str]] | None:
        """The template renderer's hook for one delivery (None: leave the bodies alone)."""
        if not enabled or self.base_url is None:
            return None

        def apply(html: str, text: str) -> tuple[str, str]:
            return self.rewrite(html, text, delivery_id)

        return apply
