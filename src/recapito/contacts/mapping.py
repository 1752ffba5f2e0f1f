"""Which source column holds which contact field.

Canonical fields: ``id``, ``email``, ``pec``, ``phone``, ``first_name``, ``last_name``,
``address``, ``postcode``, ``city``, ``province``, ``timezone``, ``consent_email``,
``consent_sms``.

A mapping can be written as a string (``email=email,pec=pec,phone=cellulare``), as a
TOML or JSON file holding a table of ``field = "column"`` (top level, or under a
``[mapping]``/``[columns]`` table), or left out entirely. Fields the mapping does not
name are detected from common Italian and English header names (``e-mail``,
``cellulare``, ``città``, ``codice_cliente``…) unless ``auto`` is off. Writing a field
with an empty value (``pec=``) says "this source has none" and stops detection for it.

``resolve(mapping, columns)`` checks the mapping against the real header: a mapped
column that does not exist is an ``InputError`` naming it and listing the columns that do.
Header names are matched exactly first, then ignoring case, accents, spaces and
punctuation (``E-Mail`` matches ``email``).
"""

from __future__ import annotations

import json
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recapito.errors import InputError

FIELDS = (
    "id",
    "email",
    "pec",
    "phone",
    "first_name",
    "last_name",
    "address",
    "postcode",
    "city",
    "province",
    "timezone",
    "consent_email",
    "consent_sms",
)

# Header names recognised for each field, compared after ``header_key`` folding
# (lowercase, no accents, only letters and digits). Earlier names win.
ALIASES: dict[str, tuple[str, ...]] = {
    "id": (
        "id",
        "codicecliente",
        "codcliente",
        "idcliente",
        "clienteid",
        "customerid",
        "contactid",
        "ndg",
        "codice",
        "matricola",
    ),
    "email": (
        "email",
        "mail",
        "emailaddress",
        "indirizzoemail",
        "posta",
        "postaelettronica",
        "emailprivata",
        "emailpersonale",
    ),
    "pec": ("pec", "emailpec", "indirizzopec", "postacertificata", "mailpec"),
    "phone": (
        "cellulare",
        "cell",
        "mobile",
        "telefonocellulare",
        "numerocellulare",
        "mobilephone",
        "phone",
        "telefono",
        "tel",
        "phonenumber",
        "msisdn",
    ),
    "first_name": ("nome", "firstname", "givenname", "first", "name"),
    "last_name": ("cognome", "lastname", "surname", "familyname", "last"),
    "address": ("indirizzo", "address", "via", "street", "indirizzoresidenza"),
    "postcode": ("cap", "postcode", "postalcode", "zip", "zipcode", "codicepostale"),
    "city": ("citta", "comune", "city", "localita", "town"),
    "province": ("provincia", "prov", "province", "siglaprovincia", "state"),
    "timezone": ("fusoorario", "timezone", "tz", "fuso"),
    "consent_email": (
        "consensoemail",
        "consensomail",
        "consenso",
        "consent",
        "consentemail",
        "emailconsent",
        "privacyemail",
        "optinemail",
        "optin",
        "marketingconsent",
    ),
    "consent_sms": ("consensosms", "consentsms", "smsconsent", "optinsms", "privacysms"),
}


def header_key(name: str) -> str:
    """Fold a header name for loose matching: ``Città`` → ``citta``, ``E-Mail`` → ``email``."""
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(ch for ch in decomposed.lower() if ch.isascii() and ch.isalnum())


@dataclass(frozen=True)
class ColumnMapping:
    """Source column per canonical field.

    ``None`` means "not specified" (detected when ``auto`` is on); ``""`` means
    "explicitly absent".
    """

    id: str | None = None
    email: str | None = None
    pec: str | None = None
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    address: str | None = None
    postcode: str | None = None
    city: str | None = None
    province: str | None = None
    timezone: str | None = None
    consent_email: str | None = None
    consent_sms: str | None = None
    auto: bool = True

    def as_dict(self) -> dict[str, str]:
        """Field → column for the fields that name a column."""
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name)}

    def column(self, name: str) -> str | None:
        """The source column for a field, or None when the field is absent."""
        if name not in FIELDS:
            raise KeyError(name)
        value: str | None = getattr(self, name)
        return value or None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "mapping") -> ColumnMapping:
        """Build from ``{field: column}``; unknown fields are an ``InputError``."""
        values: dict[str, Any] = {}
        for key, value in data.items():
            field = str(key).strip().lower()
            if field == "auto":
                if not isinstance(value, bool):
                    raise InputError(f"{origin}: 'auto' must be true or false")
                values["auto"] = value
                continue
            if field not in FIELDS:
                raise InputError(f"{origin}: unknown field {key!r} (known: {', '.join(FIELDS)})")
            if value is not None and not isinstance(value, str):
                raise InputError(f"{origin}: the column for {field!r} must be a string")
            values[field] = (value or "").strip()
        return cls(**values)

    @classmethod
    def parse(cls, spec: str | Path | None, columns: Sequence[str] | None = None) -> ColumnMapping:
        """A mapping from inline ``field=column`` pairs, a ``.toml``/``.json`` file, or
        None/"" (detection only). With ``columns`` the result is also resolved against
        that header (see ``resolve``), so a missing column fails here."""
        mapping = cls.load(spec)
        return resolve(mapping, columns) if columns is not None else mapping

    @classmethod
    def from_pairs(cls, text: str) -> ColumnMapping:
        """Parse ``field=column,field=column``; whitespace around names is ignored."""
        pairs: dict[str, str] = {}
        for item in text.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise InputError(f"mapping {text!r}: expected field=column, got {item.strip()!r}")
            if key.strip().lower() in pairs:
                raise InputError(f"mapping {text!r}: field {key.strip()!r} given twice")
            pairs[key.strip().lower()] = value.strip()
        if "auto" in pairs:
            raw_auto = pairs.pop("auto").lower()
            if raw_auto not in ("true", "false", "yes", "no", "1", "0"):
                raise InputError(f"mapping {text!r}: auto must be true or false")
            data: dict[str, Any] = dict(pairs)
            data["auto"] = raw_auto in ("true", "yes", "1")
            return cls.from_dict(data, origin=f"mapping {text!r}")
        return cls.from_dict(pairs, origin=f"mapping {text!r}")

    @classmethod
    def from_file(cls, path: str | Path) -> ColumnMapping:
        """Read a TOML (``.toml``) or JSON (any other suffix) mapping file."""
        p = Path(path)
        origin = f"mapping file {p}"
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{origin}: no such file") from None
        except OSError as exc:
            raise InputError(f"{origin}: cannot be read ({exc.strerror or exc})") from None
        try:
            if p.suffix.lower() == ".toml":
                data: Any = tomllib.loads(raw.decode("utf-8-sig"))
            else:
                data = json.loads(raw.decode("utf-8-sig"))
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
            raise InputError(f"{origin}: not valid {kind} ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{origin}: expected a table of field = column")
        for section in ("mapping", "columns"):
            if isinstance(data.get(section), dict):
                data = data[section]
                break
        return cls.from_dict(data, origin=origin)

    @classmethod
    def load(cls, spec: str | Path | None) -> ColumnMapping:
        """A mapping from a file path (``.toml``/``.json``), an inline string, or None."""
        if spec is None or (isinstance(spec, str) and not spec.strip()):
            return cls()
        if isinstance(spec, Path):
            return cls.from_file(spec)
        if "=" not in spec and Path(spec).suffix.lower() in (".toml", ".json"):
            return cls.from_file(spec)
        if "=" not in spec:
            raise InputError(f"mapping {spec!r}: expected field=column pairs or a .toml/.json file")
        return cls.from_pairs(spec)


def detect(columns: Sequence[str]) -> ColumnMapping:
    """Guess the mapping from header names alone (no explicit entries)."""
    return resolve(ColumnMapping(), columns)


def _find(column: str, columns: Sequence[str]) -> str | None:
    if column in columns:
        return column
    folded = header_key(column)
    matches = [c for c in columns if header_key(c) == folded]
    return matches[0] if len(matches) == 1 else None


def resolve(mapping: ColumnMapping, columns: Sequence[str]) -> ColumnMapping:
    """Check ``mapping`` against the real header and fill in detected fields.

    The result names real column names only (or ``""`` for absent fields) and has
    ``auto`` off, so resolving it again changes nothing.
    """
    available = [c for c in columns if c != "_line"]
    used: set[str] = set()
    resolved: dict[str, str] = {}
    for name in FIELDS:
        wanted: str | None = getattr(mapping, name)
        if wanted is None or wanted == "":
            continue
        found = _find(wanted, available)
        if found is None:
            listing = ", ".join(available) if available else "(none)"
            raise InputError(
                f"mapping: column {wanted!r} for {name} not found; available columns: {listing}"
            )
        resolved[name] = found
        used.add(found)
    if mapping.auto:
        by_key: dict[str, str] = {}
        for col in available:
            by_key.setdefault(header_key(col), col)
        for name in FIELDS:
            if getattr(mapping, name) is not None:
                continue
            for alias in ALIASES[name]:
                hit = by_key.get(alias)
                if hit is not None and hit not in used:
                    resolved[name] = hit
                    used.add(hit)
                    break
    values: dict[str, Any] = {name: resolved.get(name, "") for name in FIELDS}
    return ColumnMapping(**values, auto=False)
