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

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from recapito.render.links import MARK, TAG, LinkSlots, href_of, trackable_url
from recapito.tracking.tokens import TokenSigner

# case-sensitive: a literal prefix lets the regex engine skip ahead (an IGNORECASE scan is
# 5-10 times slower on a text part); upper-case URLs in a text part stay untracked
_TEXT_URL = re.compile(r"""https?://[^\s<>"'()\[\]{}]+""")
_TRAILING = ".,;:!?"
_BODY_END = "</body>"
_CACHE_LIMIT = 10_000

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
    # per-template decisions and text-part URLs seen (the same in every message)
    _plans: dict[LinkSlots, dict[str, tuple[str | None, str | None]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _text_urls: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

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
        if not trackable_url(url):
            return False
        return not (self.base_url is not None and url.startswith(self.base_url + "/"))

    def _clicks(self, delivery_id: int) -> Callable[[str], str]:
        """``url -> click URL`` for one message: one index per distinct URL, in the order
        of first appearance (HTML first, then the text part)."""
        click = self.signer.clicker(delivery_id, f"{self.base_url}/c/")
        click_url: dict[str, str] = {}

        def tracked(url: str) -> str:
            found = click_url.get(url)
            if found is None:
                found = click_url[url] = click(len(click_url), url)
            return found

        return tracked

    def _tag(self, whole: str, tracked: Callable[[str], str]) -> str:
        """One rendered ``<a>``/``<area>`` tag with its href tracked (or as it was)."""
        found = href_of(whole)
        if found is None:
            return whole
        href, url = found
        if not self._trackable(url):
            return whole
        start, end = href.span()
        return f'{whole[:start]}{href.group(1)}"{tracked(url)}"{whole[end:]}'

    def _text(self, text: str, tracked: Callable[[str], str]) -> str:
        seen = self._text_urls  # matched text -> its trackable URL, or "" (not tracked)

        def text_url(match: re.Match[str]) -> str:
            url = match.group(0)
            target = seen.get(url)
            if target is None:
                stripped = url.rstrip(_TRAILING)
                target = stripped if self._trackable(stripped) else ""
                if len(seen) < _CACHE_LIMIT:
                    seen[url] = target
            if not target:
                return url
            return tracked(target) + url[len(target) :]

        return _TEXT_URL.sub(text_url, text)

    def _pixel(self, delivery_id: int) -> str:
        return (
            f'<img src="{self.base_url}/o/{self.signer.open_token(delivery_id)}" width="1" '
            'height="1" alt="" border="0" style="display:block;width:1px;height:1px;border:0" />'
        )

    @staticmethod
    def _with_pixel(html: str, pixel: str) -> str:
        end = html.lower().rfind(_BODY_END)
        return html + pixel if end < 0 else f"{html[:end]}{pixel}\n{html[end:]}"

    def rewrite(self, html: str, text: str, delivery_id: int) -> tuple[str, str]:
        """The bodies with tracked links and the open pixel (no change without a base):
        the rendered HTML scanned for links (templates ``recapito.render.links`` could not
        mark, and any HTML given as it is)."""
        if self.base_url is None:
            return html, text
        tracked = self._clicks(delivery_id)
        html = TAG.sub(lambda match: self._tag(match.group(0), tracked), html)
        text = self._text(text, tracked)
        return self._with_pixel(html, self._pixel(delivery_id)), text

    def _plan(self, slots: LinkSlots) -> dict[str, tuple[str | None, str | None]]:
        """Per slot key: (URL to track, None) or (None, href as written) for a static
        link, (None, None) for a dynamic one; decided once per template."""
        plan = self._plans.get(slots)
        if plan is None:
            plan = {
                key: (None, None)
                if slot.url is None
                else (slot.url, None)
                if self._trackable(slot.url)
                else (None, slot.raw)
                for key, slot in slots.slots.items()
            }
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[slots] = plan
        return plan

    def rewrite_marked(
        self, html: str, text: str, delivery_id: int, slots: LinkSlots
    ) -> tuple[str, str]:
        """``rewrite`` for the output of a marked template (``recapito.render.links``):
        the same result, with no scan of the HTML: click URLs go into the slots."""
        plan = self._plan(slots)
        tracked = self._clicks(delivery_id)
        parts = html.split(MARK)
        out = [parts[0]]
        append = out.append
        for i in range(1, len(parts)):
            part = parts[i]
            target, raw = plan[part[:2]]
            if target is not None:
                append(f'"{tracked(target)}"')
                append(part[2:])
            elif raw is not None:
                append(raw)
                append(part[2:])
            else:  # the rendered tag, up to its first ">" (values cannot hold one)
                end = part.index(">", 2) + 1
                append(self._tag(part[2:end], tracked))
                append(part[end:])
        pixel = self._pixel(delivery_id) if self.base_url is not None else ""
        tail = out[-1]
        end = tail.rfind(_BODY_END) if slots.lower_body_end else -1
        if end >= 0:  # the last "</body>" of the message: nothing comes after the tail
            out[-1] = f"{tail[:end]}{pixel}\n{tail[end:]}" if pixel else tail
            html = "".join(out)
        else:
            html = "".join(out)
            if pixel:
                html = self._with_pixel(html, pixel)
        return html, self._text(text, tracked)

    def transform(self, delivery_id: int, enabled: bool = True) -> LinkTransform | None:
        """The template renderer's hook for one delivery (None: leave the bodies alone)."""
        if not enabled or self.base_url is None:
            return None
        return LinkTransform(self, delivery_id)


@dataclass(frozen=True)
class LinkTransform:
    """Tracking of one delivery's bodies: called with rendered bodies (scans them), or,
    through ``marked``, with the output of a template's marked HTML and its link slots."""

    tracker: Tracker
    delivery_id: int

    def __call__(self, html: str, text: str) -> tuple[str, str]:
        return self.tracker.rewrite(html, text, self.delivery_id)

    def marked(self, html: str, text: str, slots: LinkSlots) -> tuple[str, str]:
        return self.tracker.rewrite_marked(html, text, self.delivery_id, slots)
