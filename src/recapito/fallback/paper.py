"""Paper letters: A4 PDFs rendered with Typst, plus a manifest for the print house.

``render_letters(letters, out_dir, batch=...)`` validates each letter's Italian postal
address, renders the valid ones with Typst (compiled in-process by the ``typst`` package,
with the fonts embedded in it: the output does not depend on the machine's fonts) and
writes, in ``out_dir`` (mode 0700):

- ``batch=False``: one PDF per letter (``<letter id>.pdf``);
- ``batch=True``: one PDF with every letter (``letters.pdf``), each letter starting on a
  new page; the manifest is its index (first and last page of each letter);
- ``manifest.csv`` and ``manifest.json``: letter id, file, pages (first, last, count),
  product (``posta4``, ``raccomandata``…), the address lines as printed and the SHA-256 of
  the PDF file; the JSON also lists the rejected letters with their errors;
- ``rejected.csv``: letter id and errors of each letter that was not rendered.

Every file is mode 0600: letters describe people.

Layout: the recipient's address sits in the envelope window, DIN 5008 form B by default
(window 20 mm from the left edge, 45 mm from the top, 85 × 45 mm: a 17.7 mm zone for the
return line and postal remarks such as RACCOMANDATA, then six address lines), with fold
marks at 105 and 210 mm and the hole mark at 148.5 mm; ``WindowLayout`` moves it (form A:
``WindowLayout.din5008_a()``). Then place and date, subject, the body rendered from a small
sandboxed Jinja template (the same environment as the e-mail templates) and the closing.

Italian address rules (Poste Italiane): 3 to 5 lines for a national address (recipient,
optional extra and building lines, street, then ``CAP LOCALITÀ PR``), at most 44 characters
a line, a five-digit CAP, a two-letter province code, capital letters preferred (the
address is printed in capitals; accents are kept, and characters count as the reader sees
them, after NFC normalisation). A letter that breaks a rule goes to ``rejected`` with its
reasons; it never stops the batch.

Contact data never becomes Typst markup: the letters travel to the compiler as one JSON
string (``sys.inputs``) and the fixed template shows its values as plain text, so a name
such as ``#panic("x") *bold*`` prints exactly as written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import jinja2

from recapito.errors import InputError
from recapito.render.template import _environment

__all__ = [
    "MAX_LINE",
    "PRODUCTS",
    "PROVINCES",
    "Letter",
    "LetterTemplate",
    "Manifest",
    "ManifestEntry",
    "PaperOptions",
    "RejectedLetter",
    "SenderBlock",
    "WindowLayout",
    "address_lines",
    "render_letters",
    "validate_address",
]

MAX_LINE = 44  # Poste Italiane: characters a line of the address
MAX_LINES_IT = 5  # national address: recipient, two optional lines, street, CAP line
ADDRESS_COLUMNS = 6  # CSV columns for the address lines (the DIN window's six lines)

# Products the print house knows, and the remark printed in the window's remark zone.
PRODUCTS: dict[str, str] = {
    "posta4": "",
    "posta1": "POSTA1",
    "posta_massiva": "",
    "raccomandata": "RACCOMANDATA",
    "raccomandata_ar": "RACCOMANDATA A/R",
}

# Province codes (sigle) in use, the Sardinian ones of the 2016 and 2025 orders included.
_PROVINCE_CODES = """AG AL AN AO AP AQ AR AT AV BA BG BI BL BN BO BR BS BT BZ CA CB CE CH CI CL CN
CO CR CS CT CZ EN FC FE FG FI FM FR GE GO GR IM IS KR LC LE LI LO LT LU MB MC ME MI MN MO MS MT
NA NO NU OG OR OT PA PC PD PE PG PI PN PO PR PT PU PV PZ RA RC RE RG RI RM RN RO SA SI SO SP SR
SS SU SV TA TE TN TO TP TR TS TV UD VA VB VC VE VI VR VS VT VV"""
PROVINCES = frozenset(_PROVINCE_CODES.split())

_CAP = re.compile(r"^\d{5}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_MONTH_NAMES = "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre \
novembre dicembre"
_MONTHS = _MONTH_NAMES.split()

DEFAULT_SUBJECT = "Comunicazione importante per {{ name }}"
DEFAULT_BODY = """Gentile {{ name }},

non siamo riusciti a recapitarLe per posta elettronica, in modo sicuro, una comunicazione \
che La riguarda. Per questo Le scriviamo per lettera.

La invitiamo a verificare presso la Sua filiale o il nostro servizio clienti i recapiti \
che ci ha comunicato, in particolare il Suo indirizzo e-mail.

Cordiali saluti."""


@dataclass(frozen=True)
class WindowLayout:
    """Where the address window is on the A4 page (millimetres from the top-left corner)."""

    left_mm: float = 20.0
    top_mm: float = 45.0
    width_mm: float = 85.0
    height_mm: float = 45.0
    remark_zone_mm: float = 17.7  # return line and postal remarks, above the address
    margin_left_mm: float = 25.0
    margin_right_mm: float = 20.0
    fold_marks: bool = True

    def __post_init__(self) -> None:
        if not (
            self.left_mm >= 0
            and self.left_mm + self.width_mm <= 210
            and self.top_mm >= 0
            and self.top_mm + self.height_mm <= 297
            and 0 < self.remark_zone_mm < self.height_mm
        ):
            raise InputError(f"window layout off the A4 page: {self}")

    @classmethod
    def din5008_b(cls) -> WindowLayout:
        return cls()

    @classmethod
    def din5008_a(cls) -> WindowLayout:
        return cls(top_mm=27.0)


@dataclass(frozen=True)
class SenderBlock:
    """Who writes: the return line in the window, and the closing."""

    name: str = "Recapito S.p.A."
    return_line: str = "Recapito S.p.A. · Casella Postale 1 · 20100 Milano MI"
    place: str = "Milano"
    signature: str = "Servizio Clienti"


@dataclass(frozen=True)
class LetterTemplate:
    """Subject and body as Jinja sources (sandboxed, undefined names are errors).

    Names available: the letter's ``variables``, plus ``name`` (the recipient line),
    ``letter_id`` and ``product``. The body is plain text: blank lines separate
    paragraphs, single new lines break lines.
    """

    subject: str = DEFAULT_SUBJECT
    body: str = DEFAULT_BODY

    def compiled(self) -> tuple[jinja2.Template, jinja2.Template]:
        env = _environment(autoescape=False)
        return env.from_string(self.subject), env.from_string(self.body)


@dataclass(frozen=True)
class PaperOptions:
    window: WindowLayout = field(default_factory=WindowLayout)
    sender: SenderBlock = field(default_factory=SenderBlock)
    template: LetterTemplate = field(default_factory=LetterTemplate)
    on: date | None = None  # the letters' date (default: today, UTC)
    uppercase: bool = True  # Poste Italiane prefers capitals in the address
    batch_name: str = "letters"


@dataclass(frozen=True)
class Letter:
    """One letter: the recipient's postal address, and what to write.

    ``lines`` are the lines between the recipient and the CAP line (extra information,
    building, street and number). ``subject``/``body`` override the template when given.
    """

    letter_id: str
    recipient: str
    lines: Sequence[str]
    postcode: str
    city: str
    province: str
    product: str = "posta4"
    subject: str | None = None
    body: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    contact_id: str | None = None
    campaign: str | None = None
    delivery_id: int | None = None


@dataclass(frozen=True)
class ManifestEntry:
    letter_id: str
    file: str
    first_page: int
    last_page: int
    pages: int
    product: str
    address_lines: tuple[str, ...]
    sha256: str
    contact_id: str | None = None
    campaign: str | None = None
    delivery_id: int | None = None


@dataclass(frozen=True)
class RejectedLetter:
    letter_id: str
    errors: tuple[str, ...]
    contact_id: str | None = None
    campaign: str | None = None
    delivery_id: int | None = None


@dataclass
class Manifest:
    out_dir: Path
    batch: bool
    letters: list[ManifestEntry]
    rejected: list[RejectedLetter]
    files: list[Path]
    csv_path: Path
    json_path: Path
    rejected_path: Path

    @property
    def pages(self) -> int:
        return sum(e.pages for e in self.letters)


# ---------------------------------------------------------------------------- addresses


def _clean(value: object) -> str:
    text = "" if value is None else str(value)
    return " ".join(unicodedata.normalize("NFC", text).split())


def address_lines(letter: Letter, *, uppercase: bool = True) -> tuple[str, ...]:
    """The address as printed: recipient, extra lines, ``CAP LOCALITÀ PR``."""
    city = _clean(letter.city)
    province = _clean(letter.province).upper()
    lines = [_clean(letter.recipient), *(_clean(x) for x in letter.lines if _clean(x))]
    lines.append(" ".join(p for p in (_clean(letter.postcode), city, province) if p))
    return tuple(line.upper() for line in lines) if uppercase else tuple(lines)


def validate_address(letter: Letter, *, uppercase: bool = True) -> list[str]:
    """The reasons this letter's address breaks the Italian rules (empty when valid)."""
    errors: list[str] = []
    raw = [letter.recipient, *letter.lines, letter.postcode, letter.city, letter.province]
    if any(_CONTROL.search(str(v or "")) for v in raw):
        errors.append("address: control characters")
    if not _clean(letter.recipient):
        errors.append("address: no recipient line")
    if not [x for x in letter.lines if _clean(x)]:
        errors.append("address: no street line (via, piazza… and number, or casella postale)")
    postcode = _clean(letter.postcode)
    if not _CAP.match(postcode):
        errors.append(f"address: CAP {postcode!r} is not five digits")
    if not _clean(letter.city):
        errors.append("address: no locality")
    province = _clean(letter.province).upper()
    if province not in PROVINCES:
        errors.append(f"address: province {province!r} is not an Italian province code")
    lines = address_lines(letter, uppercase=uppercase)
    if len(lines) > MAX_LINES_IT:
        errors.append(f"address: {len(lines)} lines (at most {MAX_LINES_IT} in Italy)")
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            errors.append(f"address: line {number} has {len(line)} characters (at most {MAX_LINE})")
    if letter.product not in PRODUCTS:
        errors.append(f"product {letter.product!r} unknown (one of {', '.join(PRODUCTS)})")
    if not _clean(letter.letter_id):
        errors.append("letter id: empty")
    return errors


# ---------------------------------------------------------------------------- rendering

# The fixed template: every value comes from the JSON in sys.inputs and is shown as text.
_TYPST = r"""
#let data = json(bytes(sys.inputs.data))
#let w = data.window
#let mm(x) = x * 1mm
#set document(title: data.title, author: data.author)
#set page(
  paper: "a4",
  margin: (left: mm(w.margin_left_mm), right: mm(w.margin_right_mm), top: 20mm, bottom: 20mm),
  background: if w.fold_marks {
    place(top + left, dx: 5mm, dy: 105mm, line(length: 5mm, stroke: 0.3pt))
    place(top + left, dx: 5mm, dy: 148.5mm, line(length: 8mm, stroke: 0.3pt))
    place(top + left, dx: 5mm, dy: 210mm, line(length: 5mm, stroke: 0.3pt))
  },
)
#set text(font: "Libertinus Serif", size: 11pt, lang: "it")
#set par(justify: false, leading: 0.6em, spacing: 1.1em)
#for (i, l) in data.letters.enumerate() {
  if i > 0 { pagebreak() }
  [#metadata(l.id) <letter-start>]
  place(top + left, dx: mm(w.left_mm - w.margin_left_mm), dy: mm(w.top_mm) - 20mm,
    block(width: mm(w.width_mm), height: mm(w.height_mm), clip: true, {
      block(width: 100%, height: mm(w.remark_zone_mm), {
        align(bottom, {
          text(size: 7pt, l.return_line)
          if l.remark != "" { linebreak(); text(size: 8pt, weight: "bold", l.remark) }
        })
      })
      set text(font: "DejaVu Sans Mono", size: 9pt)
      set par(leading: 0.45em, spacing: 0.45em)
      for line in l.address { line; linebreak() }
    }))
  v(mm(w.top_mm + w.height_mm) - 20mm + 8mm)
  align(right, l.place_date)
  v(6mm)
  text(weight: "bold", l.subject)
  v(4mm)
  for p in l.body {
    par(p.join(linebreak()))
  }
  v(6mm)
  l.signature
  [#context [#metadata((id: l.id, page: here().page())) <letter-end>]]
}
"""


def _italian_date(day: date) -> str:
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


def _paragraphs(text: str) -> list[list[str]]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: list[list[str]] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [" ".join(_CONTROL.sub(" ", ln).split()) for ln in block.split("\n")]
        lines = [ln for ln in lines if ln]
        if lines:
            out.append(lines)
    return out


@dataclass
class _Prepared:
    letter: Letter
    address: tuple[str, ...]
    data: dict[str, Any]


def _prepare(
    letter: Letter, options: PaperOptions, compiled: tuple[jinja2.Template, jinja2.Template]
) -> _Prepared | list[str]:
    errors = validate_address(letter, uppercase=options.uppercase)
    if errors:
        return errors
    address = address_lines(letter, uppercase=options.uppercase)
    context = {
        **dict(letter.variables),
        "name": _clean(letter.recipient),
        "letter_id": letter.letter_id,
        "product": letter.product,
    }
    try:
        subject = letter.subject if letter.subject is not None else compiled[0].render(context)
        body = letter.body if letter.body is not None else compiled[1].render(context)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        return [f"template: {exc}"]
    day = options.on or datetime.now(UTC).date()
    sender = options.sender
    return _Prepared(
        letter,
        address,
        {
            "id": letter.letter_id,
            "return_line": _clean(sender.return_line),
            "remark": PRODUCTS[letter.product],
            "address": list(address),
            "place_date": f"{_clean(sender.place)}, {_italian_date(day)}".lstrip(", "),
            "subject": " ".join(_CONTROL.sub(" ", subject).split()),
            "body": _paragraphs(body),
            "signature": _clean(sender.signature),
        },
    )


class _Typst:
    """One Typst compiler over the fixed template (fonts loaded once)."""

    def __init__(self, options: PaperOptions, workdir: Path) -> None:
        import typst

        self._typst = typst
        source = workdir / "letter.typ"
        source.write_text(_TYPST, encoding="utf-8")
        self.options = options
        self.compiler = typst.Compiler(str(source), root=str(workdir), ignore_system_fonts=True)
        day = options.on or datetime.now(UTC).date()
        self.timestamp = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())

    def compile(self, letters: list[dict[str, Any]]) -> tuple[bytes, list[tuple[int, int]]]:
        """The PDF of these letters, and each letter's first and last page."""
        payload = {
            "window": asdict(self.options.window),
            "title": f"{len(letters)} letters" if len(letters) != 1 else str(letters[0]["id"]),
            "author": _clean(self.options.sender.name),
            "letters": letters,
        }
        pdf = self.compiler.compile(
            sys_inputs={"data": json.dumps(payload, ensure_ascii=False)},
            timestamp=self.timestamp,
        )
        if not isinstance(pdf, bytes):  # pragma: no cover - typst returns bytes for PDF
            raise TypeError("typst returned no PDF")
        ends = json.loads(str(self.compiler.query("<letter-end>", field="value")))
        pages: list[tuple[int, int]] = []
        first = 1
        for end in ends:
            pages.append((first, int(end["page"])))
            first = int(end["page"]) + 1
        if len(pages) != len(letters):  # pragma: no cover - the template marks every letter
            raise RuntimeError("typst: letter page marks missing")
        return pdf, pages

    @property
    def error(self) -> type[Exception]:
        error: type[Exception] = self._typst.TypstError
        return error


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _file_name(letter_id: str) -> str:
    safe = _SAFE_NAME.sub("_", letter_id)[:80]
    if safe != letter_id:
        safe += "-" + hashlib.sha256(letter_id.encode()).hexdigest()[:8]
    return f"{safe}.pdf"


def render_letters(
    letters: list[Letter],
    out_dir: str | Path,
    *,
    batch: bool,
    options: PaperOptions | None = None,
) -> Manifest:
    """Validate, render and index the letters (see the module docstring)."""
    options = options or PaperOptions()
    out = _private_dir(Path(out_dir))
    compiled = options.template.compiled()
    rejected: list[RejectedLetter] = []
    ready: list[_Prepared] = []
    seen: set[str] = set()

    def reject(letter: Letter, errors: Sequence[str]) -> None:
        rejected.append(
            RejectedLetter(
                letter.letter_id,
                tuple(errors),
                letter.contact_id,
                letter.campaign,
                letter.delivery_id,
            )
        )

    for letter in letters:
        if letter.letter_id in seen:
            reject(letter, ["letter id: duplicate"])
            continue
        seen.add(letter.letter_id)
        prepared = _prepare(letter, options, compiled)
        if isinstance(prepared, list):
            reject(letter, prepared)
        else:
            ready.append(prepared)

    entries: list[ManifestEntry] = []
    files: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="recapito-typst-") as work:
        engine = _Typst(options, Path(work))

        def entry(p: _Prepared, name: str, pages: tuple[int, int], digest: str) -> ManifestEntry:
            return ManifestEntry(
                letter_id=p.letter.letter_id,
                file=name,
                first_page=pages[0],
                last_page=pages[1],
                pages=pages[1] - pages[0] + 1,
                product=p.letter.product,
                address_lines=p.address,
                sha256=digest,
                contact_id=p.letter.contact_id,
                campaign=p.letter.campaign,
                delivery_id=p.letter.delivery_id,
            )

        def single(p: _Prepared) -> tuple[bytes, tuple[int, int]] | None:
            try:
                pdf, pages = engine.compile([p.data])
            except engine.error as exc:
                reject(p.letter, [f"typst: {str(exc).splitlines()[0] if str(exc) else exc}"])
                return None
            return pdf, pages[0]

        if batch and ready:
            try:
                pdf, ranges = engine.compile([p.data for p in ready])
            except engine.error:
                # find the letters Typst refuses, one by one; the batch goes on without them
                ready = [p for p in ready if single(p) is not None]
                pdf, ranges = engine.compile([p.data for p in ready]) if ready else (b"", [])
            if ready:
                name = f"{options.batch_name}.pdf"
                write_private(out / name, pdf)
                files.append(out / name)
                digest = hashlib.sha256(pdf).hexdigest()
                entries.extend(
                    entry(p, name, r, digest) for p, r in zip(ready, ranges, strict=True)
                )
        elif not batch:
            for p in ready:
                result = single(p)
                if result is None:
                    continue
                pdf, pages = result
                name = _file_name(p.letter.letter_id)
                write_private(out / name, pdf)
                files.append(out / name)
                entries.append(entry(p, name, pages, hashlib.sha256(pdf).hexdigest()))

    manifest = Manifest(
        out_dir=out,
        batch=batch,
        letters=entries,
        rejected=rejected,
        files=files,
        csv_path=out / "manifest.csv",
        json_path=out / "manifest.json",
        rejected_path=out / "rejected.csv",
    )
    _write_manifest(manifest, options)
    return manifest


def _write_manifest(manifest: Manifest, options: PaperOptions) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "letter_id",
            "file",
            "first_page",
            "last_page",
            "pages",
            "product",
            *(f"address_line_{i}" for i in range(1, ADDRESS_COLUMNS + 1)),
            "sha256",
            "campaign",
            "delivery_id",
        ]
    )
    for e in manifest.letters:
        lines = list(e.address_lines) + [""] * (ADDRESS_COLUMNS - len(e.address_lines))
        writer.writerow(
            [
                e.letter_id,
                e.file,
                e.first_page,
                e.last_page,
                e.pages,
                e.product,
                *lines[:ADDRESS_COLUMNS],
                e.sha256,
                e.campaign or "",
                "" if e.delivery_id is None else e.delivery_id,
            ]
        )
    write_private(manifest.csv_path, buf.getvalue().encode("utf-8"))

    rej = io.StringIO()
    rwriter = csv.writer(rej, lineterminator="\n")
    rwriter.writerow(["letter_id", "errors", "campaign", "delivery_id"])
    for r in manifest.rejected:
        rwriter.writerow(
            [
                r.letter_id,
                "; ".join(r.errors),
                r.campaign or "",
                "" if r.delivery_id is None else r.delivery_id,
            ]
        )
    write_private(manifest.rejected_path, rej.getvalue().encode("utf-8"))

    doc = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "batch" if manifest.batch else "single",
        "window": asdict(options.window),
        "files": [
            {"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in manifest.files
        ],
        "letters": [
            {**asdict(e), "address_lines": list(e.address_lines)} for e in manifest.letters
        ],
        "rejected": [{**asdict(r), "errors": list(r.errors)} for r in manifest.rejected],
    }
    write_private(
        manifest.json_path, (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode()
    )
