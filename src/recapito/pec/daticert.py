"""``daticert.xml``: the certification data every PEC receipt carries (DM 2 Nov 2005, RFC 6109).

The document (root ``postacert``)::

    <postacert tipo="avvenuta-consegna" errore="nessuno">
      <intestazione>
        <mittente>…</mittente>
        <destinatari tipo="certificato|esterno">…</destinatari>   (one or more)
        <risposte>…</risposte>
        <oggetto>…</oggetto>
      </intestazione>
      <dati>
        <gestore-emittente>…</gestore-emittente>
        <data zona="+0100"><giorno>dd/mm/yyyy</giorno><ora>hh:mm:ss</ora></data>
        <identificativo>…</identificativo>
        <msgid>&lt;…&gt;</msgid>
        <ricevuta tipo="completa|breve|sintetica"/>
        <consegna>…</consegna>
        <ricezione>…</ricezione>
        <errore-esteso>…</errore-esteso>
      </dati>
    </postacert>

Read leniently (providers differ in encodings, DOCTYPE lines, namespaces, case and
whitespace) but safely: a document declaring entities is refused (no entity expansion), and
ElementTree never fetches external DTDs.
"""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

TIPI = frozenset(
    {
        "accettazione",
        "non-accettazione",
        "presa-in-carico",
        "avvenuta-consegna",
        "posta-certificata",
        "errore-consegna",
        "preavviso-errore-consegna",
        "rilevazione-virus",
    }
)
ERRORI = frozenset({"nessuno", "no-dest", "no-dominio", "virus", "altro"})


class DaticertError(ValueError):
    """The bytes are not a readable daticert.xml."""


@dataclass(frozen=True)
class Destinatario:
    address: str
    tipo: str  # certificato | esterno (as written, lower case)


@dataclass(frozen=True)
class Daticert:
    tipo: str
    errore: str
    mittente: str | None
    destinatari: tuple[Destinatario, ...]
    risposte: str | None
    oggetto: str | None
    gestore: str | None
    date: dt.datetime | None  # timezone-aware
    identificativo: str | None
    msgid: str | None
    ricevuta: str | None  # completa | breve | sintetica (delivery receipts)
    consegna: str | None  # the recipient this receipt is about (delivery/error receipts)
    ricezione: tuple[str, ...] = field(default_factory=tuple)
    errore_esteso: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tipo": self.tipo,
            "errore": self.errore,
            "mittente": self.mittente,
            "destinatari": [{"address": d.address, "tipo": d.tipo} for d in self.destinatari],
            "risposte": self.risposte,
            "oggetto": self.oggetto,
            "gestore": self.gestore,
            "date": self.date.isoformat() if self.date else None,
            "identificativo": self.identificativo,
            "msgid": self.msgid,
            "ricevuta": self.ricevuta,
            "consegna": self.consegna,
            "ricezione": list(self.ricezione),
            "errore_esteso": self.errore_esteso,
        }


_ZONE = re.compile(
    r"^\s*(?:(?P<z>Z|UTC|GMT)|(?P<sign>[+-])(?P<h>\d{1,2}):?(?P<m>\d{2})?)\s*$", re.I
)
_DAY = re.compile(r"^\s*(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})\s*$")
_ISO_DAY = re.compile(r"^\s*(\d{4})-(\d{2})-(\d{2})\s*$")
_TIME = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2}))?")


def parse_zone(text: str | None) -> dt.tzinfo | None:
    if not text:
        return None
    m = _ZONE.match(text)
    if m is None:
        return None
    if m.group("z"):
        return dt.UTC
    minutes = int(m.group("h")) * 60 + int(m.group("m") or 0)
    if minutes > 18 * 60:
        return None
    return dt.timezone(dt.timedelta(minutes=-minutes if m.group("sign") == "-" else minutes))


def parse_date(zona: str | None, giorno: str | None, ora: str | None) -> dt.datetime | None:
    """``giorno`` dd/mm/yyyy, ``ora`` hh:mm:ss, ``zona`` ±hhmm -> an aware datetime."""
    if not giorno or not ora:
        return None
    day = _DAY.match(giorno)
    iso = _ISO_DAY.match(giorno) if day is None else None
    clock = _TIME.match(ora)
    if (day is None and iso is None) or clock is None:
        return None
    if day is not None:
        d, mo, y = int(day.group(1)), int(day.group(2)), int(day.group(3))
    else:
        assert iso is not None
        y, mo, d = int(iso.group(1)), int(iso.group(2)), int(iso.group(3))
    tz = parse_zone(zona)
    try:
        value = dt.datetime(
            y, mo, d, int(clock.group(1)), int(clock.group(2)), int(clock.group(3) or 0)
        )
    except ValueError:
        return None
    if tz is None:
        # no usable zone: Italian providers write Italian local time
        from zoneinfo import ZoneInfo

        return value.replace(tzinfo=ZoneInfo("Europe/Rome"))
    return value.replace(tzinfo=tz)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def _text(node: ET.Element | None) -> str | None:
    if node is None or node.text is None:
        return None
    value = " ".join(node.text.split())
    return value or None


def parse_daticert(data: bytes) -> Daticert:
    """Parse one daticert.xml; ``DaticertError`` when it cannot be read."""
    head = data[:4096]
    if b"<!ENTITY" in head.upper():
        raise DaticertError("daticert.xml declares entities: refused")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DaticertError(f"daticert.xml: {exc}") from None
    if _local(root.tag) != "postacert":
        raise DaticertError(f"daticert.xml: root <{_local(root.tag)}>, expected <postacert>")
    attrs = {k.lower(): v.strip().lower() for k, v in root.attrib.items()}
    tipo = attrs.get("tipo", "")
    if not tipo:
        raise DaticertError("daticert.xml: postacert without tipo")
    children: dict[str, list[ET.Element]] = {}
    for node in root.iter():
        children.setdefault(_local(node.tag), []).append(node)

    def first(name: str) -> ET.Element | None:
        found = children.get(name)
        return found[0] if found else None

    destinatari = tuple(
        Destinatario(address, (n.attrib.get("tipo") or "").strip().lower() or "certificato")
        for n in children.get("destinatari", [])
        if (address := _text(n)) is not None
    )
    data_node = first("data")
    zona = None
    if data_node is not None:
        zona = next((v for k, v in data_node.attrib.items() if k.lower() == "zona"), None)
    ricevuta = first("ricevuta")
    ricevuta_tipo = None
    if ricevuta is not None:
        ricevuta_tipo = (ricevuta.attrib.get("tipo") or "completa").strip().lower()
    return Daticert(
        tipo=tipo,
        errore=attrs.get("errore", "nessuno") or "nessuno",
        mittente=_text(first("mittente")),
        destinatari=destinatari,
        risposte=_text(first("risposte")),
        oggetto=_text(first("oggetto")),
        gestore=_text(first("gestore-emittente")),
        date=parse_date(zona, _text(first("giorno")), _text(first("ora"))),
        identificativo=_text(first("identificativo")),
        msgid=_text(first("msgid")),
        ricevuta=ricevuta_tipo,
        consegna=_text(first("consegna")),
        ricezione=tuple(t for n in children.get("ricezione", []) if (t := _text(n))),
        errore_esteso=_text(first("errore-esteso")),
    )


__all__ = [
    "ERRORI",
    "TIPI",
    "Daticert",
    "DaticertError",
    "Destinatario",
    "parse_date",
    "parse_daticert",
    "parse_zone",
]
