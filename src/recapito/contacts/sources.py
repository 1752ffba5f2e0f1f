"""Contact sources: CSV and Parquet files, SQL queries.

A source is described by a ``ContactSource`` (plain data, safe to pass between processes)
and read with ``load(source)``, which returns a ``Loaded``: the contacts as a polars
DataFrame plus the rows that could not be read, each with its physical line number.

CSV files are read the way CRMs and spreadsheets write them:

* delimiter ``;``, ``,``, tab or ``|``, detected from the first lines unless given;
* UTF-8 with or without BOM, UTF-16 with BOM, or a legacy single-byte encoding.
  Bytes that are not valid UTF-8 are decoded as Windows-1252 when that fits (the usual
  case for Italian exports; Latin-1 otherwise) or as charset-normalizer suggests for
  other scripts. Undecodable bytes become U+FFFD: a file never fails on a detected
  encoding. An encoding given by the caller is strict instead: the first byte it cannot
  decode is an ``InputError`` naming the line (the encoding is then wrong, and reading
  on would garble the text);
* fields quoted with ``"`` may hold the delimiter, ``""`` and line breaks;
* a record whose field count differs from the header's is rejected with the physical
  line where it starts (1-based, the header being line 1) and the rest still load.
  Extra fields at the end of a record are tolerated when they are all empty (a trailing
  delimiter); blank records are skipped.

A SQL source runs one reading statement (first keyword SELECT, WITH, VALUES or TABLE;
anything else, or several statements, is refused before connecting) on a read-only
connection: SQLite files are opened with ``mode=ro``, PostgreSQL sessions start with
``default_transaction_read_only`` on, and the transaction is always rolled back. A URL
that names a file elsewhere (http, https, ftp…) is not a database URL and is refused.

Every frame column is a string column (empty fields are null) except for Parquet and SQL
sources, which keep their native types. A ``_line`` column (Int64) says where each row
came from: the physical line for CSV, the row number (1-based) for Parquet and SQL.

Reading a CSV is vectorised: every physical line is classified once with polars string
kernels (quote count, field count, blank), records are delimited by quote parity with
numpy, and the well-formed records are parsed in one go by polars' CSV reader. An
irregular record (a quote in the middle of a field, an unterminated quote, a broken
multi-line record) is read alone by the stdlib ``csv`` module and costs only its first
line when it is bad; the parity is then recomputed after it, so one stray quote cannot
misalign the rest of the file. Past ``MAX_IRREGULAR_RECORDS`` of them the csv module
reads the remainder: malformed files stay correct, only slower.
"""

from __future__ import annotations

import codecs
import csv
import gc
import io
import itertools
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import polars as pl

from recapito.errors import InputError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

SourceKind = Literal["csv", "parquet", "sql"]
LINE_COLUMN = "_line"

CSV_SUFFIXES = frozenset({".csv", ".txt", ".tsv", ".tab", ".dat"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq", ".parq"})
DELIMITER_CANDIDATES = (";", ",", "\t", "|")
DELIMITER_NAMES = {
    "semicolon": ";",
    "comma": ",",
    "tab": "\t",
    "\\t": "\t",
    "pipe": "|",
}
# A quoted field running over more physical lines than this is taken as an
# unterminated quote rather than a genuine multi-line value.
MAX_RECORD_LINES = 50
# Western single-byte encodings that charset-normalizer may name for Italian text;
# any of them is read as Windows-1252, the superset actually written by Windows tools.
_WESTERN = frozenset(
    {
        "cp1252",
        "latin_1",
        "iso8859_15",
        "iso8859_1",
        "cp1250",
        "cp1257",
        "cp1258",
        "iso8859_10",
        "iso8859_2",
        "iso8859_3",
        "iso8859_4",
        "iso8859_9",
        "iso8859_13",
        "iso8859_14",
        "iso8859_16",
        "cp850",
        "cp858",
        "cp437",
        "mac_roman",
        "mac_latin2",
        "hp_roman8",
        "cp775",
        "cp852",
        "cp1254",
    }
)


@dataclass(frozen=True)
class ContactSource:
    """Where contacts come from.

    ``kind`` is ``csv`` or ``parquet`` (with ``path``) or ``sql`` (with ``url``, a
    SQLAlchemy connection URL, and ``query``). ``encoding`` and ``delimiter`` override
    detection for CSV; the delimiter may also be spelled ``tab``, ``semicolon``,
    ``comma`` or ``pipe``.
    """

    kind: SourceKind
    path: Path | None = None
    url: str | None = None
    query: str | None = None
    encoding: str | None = None
    delimiter: str | None = None

    def __post_init__(self) -> None:
        if self.kind in ("csv", "parquet") and self.path is None:
            raise InputError(f"contact source: a {self.kind} source needs a file path")
        if self.kind == "sql" and (not self.url or not self.query):
            raise InputError("contact source: a sql source needs both a URL and a query")
        if self.kind not in ("csv", "parquet", "sql"):
            raise InputError(f"contact source: unknown kind {self.kind!r} (csv, parquet, sql)")
        if self.kind == "sql":
            assert self.url is not None and self.query is not None
            check_database_url(self.url)
            check_read_query(self.query, self.url)
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if self.delimiter is not None:
            object.__setattr__(self, "delimiter", _delimiter(self.delimiter))
        if self.encoding is not None:
            where = f"contacts file {self.path}" if self.path is not None else "contact source"
            _check_encoding(self.encoding, where)

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        encoding: str | None = None,
        delimiter: str | None = None,
    ) -> ContactSource:
        """A file source; the kind comes from the suffix (``.parquet``/``.pq`` → Parquet,
        anything else → CSV, Parquet files being recognised by their magic bytes too)."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            kind: SourceKind = "parquet"
        elif suffix in CSV_SUFFIXES:
            kind = "csv"
        else:
            kind = "parquet" if _looks_like_parquet(p) else "csv"
        return cls(kind=kind, path=p, encoding=encoding, delimiter=delimiter)

    @classmethod
    def from_sql(cls, url: str, query: str) -> ContactSource:
        """A SQL source. ``InputError`` when ``url`` is not a database URL (an http(s)/ftp
        URL of a file is refused with advice) or ``query`` is not one reading statement."""
        return cls(kind="sql", url=url, query=query)

    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        query: str | None = None,
        encoding: str | None = None,
        delimiter: str | None = None,
    ) -> ContactSource:
        """A source from a command-line style string: a connection URL
        (``postgresql://…``, ``sqlite:///…``; needs ``query``) or a file path.

        This is the entry point for user input naming contacts: a URL that is not a
        database URL (http, https, ftp…) is refused as such, before any query is asked for.
        """
        if url_scheme(spec) is not None:
            check_database_url(spec)
            if not query:
                raise InputError(
                    f"contact source {_mask_url(spec)}: a database URL needs a query (--query)"
                )
            return cls.from_sql(spec, query)
        return cls.from_path(spec, encoding=encoding, delimiter=delimiter)

    def describe(self) -> str:
        """Human name for messages (passwords in URLs are masked)."""
        if self.kind == "sql":
            return _mask_url(self.url or "")
        return str(self.path)


@dataclass(frozen=True)
class Rejection:
    """A record that could not be read: where it starts, why, and how it begins."""

    line: int
    reason: str
    text: str = ""


@dataclass
class Loaded:
    """Contacts read from a source, plus the records that could not be read."""

    frame: pl.DataFrame
    rejected: list[Rejection] = field(default_factory=list)
    source: ContactSource | None = None
    encoding: str | None = None
    delimiter: str | None = None

    @property
    def columns(self) -> list[str]:
        """The source's own columns (without ``_line``)."""
        return [c for c in self.frame.columns if c != LINE_COLUMN]


def load(source: ContactSource) -> Loaded:
    """Read a contact source; bad input raises ``InputError`` naming it."""
    if source.kind == "csv":
        assert source.path is not None
        return read_csv(source.path, encoding=source.encoding, delimiter=source.delimiter)
    if source.kind == "parquet":
        assert source.path is not None
        return read_parquet(source.path)
    assert source.url is not None and source.query is not None
    return read_sql(source.url, source.query)


# --- files -------------------------------------------------------------------------


def _looks_like_parquet(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def _read_bytes(path: Path) -> bytes:
    name = f"contacts file {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not a file") from None
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if not data.strip(b" \t\r\n\x00\xef\xbb\xbf\xff\xfe"):
        raise InputError(f"{name}: the file is empty")
    return data


def read_parquet(path: str | Path) -> Loaded:
    p = Path(path)
    data = _read_bytes(p)
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as exc:  # polars raises several unrelated types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"contacts file {p}: not a readable Parquet file ({first})") from None
    frame = frame.drop(LINE_COLUMN, strict=False).with_row_index(LINE_COLUMN, offset=1)
    frame = frame.with_columns(pl.col(LINE_COLUMN).cast(pl.Int64))
    return Loaded(frame=frame, source=ContactSource(kind="parquet", path=p))


# --- SQL ---------------------------------------------------------------------------

# Schemes that name a file somewhere, not a database: a URL given as the contact source
# with one of these is refused with advice instead of being taken for a database URL.
NON_DATABASE_SCHEMES = frozenset(
    {
        "http",
        "https",
        "ftp",
        "ftps",
        "sftp",
        "scp",
        "ssh",
        "file",
        "s3",
        "s3a",
        "gs",
        "gcs",
        "az",
        "abfs",
        "abfss",
        "adl",
        "hdfs",
        "webdav",
        "webdavs",
        "dav",
        "davs",
        "smb",
    }
)
# The first keyword of a query that only reads.
READ_KEYWORDS = frozenset({"select", "with", "values", "table"})
# Keywords that make a statement starting with a read keyword write anyway: a
# data-modifying CTE (``with d as (delete … returning *) select …``), ``select … into``.
WRITE_KEYWORDS = frozenset({"insert", "update", "delete", "merge", "upsert", "into"})
_URL_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def url_scheme(spec: str) -> str | None:
    """The scheme of ``spec`` when it is a URL (``scheme://…``), lowercased; else None."""
    m = _URL_SCHEME_RE.match(spec)
    return m.group(1).lower() if m else None


def check_database_url(url: str) -> URL:
    """``url`` parsed as a SQLAlchemy database URL, or a one-line ``InputError``.

    A URL of a file elsewhere (http, https, ftp, s3…) is refused with advice: contact
    files are read from a local path only.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    name = f"contact source {_mask_url(url)}"
    scheme = (url_scheme(url) or "").split("+", 1)[0]
    if scheme in NON_DATABASE_SCHEMES:
        raise InputError(
            f"{name}: {scheme}:// URLs are not supported as contact files; "
            "download the file first and give its local path"
        )
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError(f"{name}: not a valid database connection URL") from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise InputError(
            f"{name}: not a database URL (unknown database kind {parsed.drivername!r}; "
            "use e.g. postgresql://… or sqlite:///…)"
        ) from None
    except ImportError as exc:
        raise InputError(f"{name}: cannot use this URL ({exc})") from None
    return parsed


def _query_excerpt(query: str, limit: int = 60) -> str:
    flat = " ".join(query.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def _sql_skeleton(query: str, backend: str) -> str | None:
    """``query`` without comments and with the contents of strings and quoted names
    blanked out, so that keywords and ``;`` can be looked for; None when a string,
    quoted name or comment never ends."""
    pg = backend == "postgresql"
    mysql = backend in ("mysql", "mariadb")
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        ch = query[i]
        nxt = query[i + 1] if i + 1 < n else ""
        if (ch == "-" and nxt == "-") or (mysql and ch == "#"):
            end = query.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
            continue
        if ch == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if query.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                elif pg and query.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                else:
                    j += 1
            if depth:
                return None
            out.append(" ")
            i = j
            continue
        if pg and ch == "$":
            m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", query[i:])
            if m and not (i and (query[i - 1].isalnum() or query[i - 1] == "_")):
                end = query.find(m.group(), i + m.end())
                if end < 0:
                    return None
                out.append(" '' ")
                i = end + m.end()
                continue
        closer = {"'": "'", '"': '"', "`": "`", "[": "]"}.get(ch)
        if closer is not None and (ch != "[" or backend in ("sqlite", "mssql")):
            escapes = mysql or (
                ch == "'" and pg and i > 0 and query[i - 1] in "eE" and not _word_before(query, i)
            )
            j = i + 1
            while j < n:
                if escapes and query[j] == "\\":
                    j += 2
                    continue
                if query[j] == closer:
                    if closer != "]" and query.startswith(closer * 2, j):
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                return None
            out.append(" '' " if ch == "'" else ' "q" ')
            i = j + 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _word_before(query: str, i: int) -> bool:
    """True when the ``e``/``E`` just before position ``i`` ends a longer word."""
    return i > 1 and (query[i - 2].isalnum() or query[i - 2] == "_")


def check_read_query(query: str, url: str = "") -> None:
    """Refuse a query that is not one reading statement, with a one-line ``InputError``.

    After comments and one trailing ``;`` are taken off, the query must be a single
    statement whose first keyword is SELECT, WITH, VALUES or TABLE, and it may not hold
    INSERT, UPDATE, DELETE, MERGE or INTO (a data-modifying CTE, ``select … into``).
    This is the first line of defence; ``read_sql`` also runs the query on a read-only
    connection.
    """
    name = f"contact source {_mask_url(url)}" if url else "contact source"
    backend = ""
    if url:
        scheme = (url_scheme(url) or "").split("+", 1)[0]
        backend = "postgresql" if scheme in ("postgresql", "postgres") else scheme
    shown = _query_excerpt(query)
    skeleton = _sql_skeleton(query, backend)
    if skeleton is None:
        raise InputError(f"{name}: query {shown} has an unterminated string, name or comment")
    body = skeleton.strip()
    if body.endswith(";"):
        body = body[:-1].rstrip()
    if not body:
        raise InputError(f"{name}: the query is empty")
    if ";" in body:
        raise InputError(
            f"{name}: query {shown} holds more than one statement; give a single SELECT"
        )
    first = re.match(r"[\s(]*([A-Za-z_]+)", body)
    keyword = first.group(1).lower() if first else ""
    if keyword not in READ_KEYWORDS:
        found = f"starts with {keyword.upper()}" if keyword else "does not start with a keyword"
        raise InputError(
            f"{name}: query {shown} is not a read-only query ({found}); "
            "it must start with SELECT, WITH, VALUES or TABLE"
        )
    writes = [
        w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", body) if w.lower() in WRITE_KEYWORDS
    ]
    if writes:
        raise InputError(
            f"{name}: query {shown} would write to the database ({writes[0].upper()}); "
            "only reading queries are allowed"
        )


def read_sql(url: str, query: str) -> Loaded:
    """Run ``query`` over a SQLAlchemy connection URL; columns keep their SQL types.

    Only a single reading statement is accepted (``check_read_query``), and it runs on a
    read-only connection: SQLite opens the file with ``mode=ro``, PostgreSQL sessions
    have ``default_transaction_read_only`` on and the transaction is declared READ ONLY,
    and on every database the transaction is rolled back at the end.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    name = f"contact source {_mask_url(url)}"
    parsed = check_database_url(url)
    check_read_query(query, url)
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    target = parsed
    if backend == "sqlite":
        target = _sqlite_read_only(parsed, name)
    elif backend == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
        options = parsed.query.get("options")
        given = " ".join(options) if isinstance(options, tuple) else (options or "")
        connect_args["options"] = f"{given} -c default_transaction_read_only=on".strip()
    try:
        engine = create_engine(target, connect_args=connect_args)
    except (SQLAlchemyError, ImportError) as exc:
        raise InputError(f"{name}: cannot use this URL ({_first_line(exc)})") from None
    try:
        with engine.connect() as conn:
            try:
                if backend == "postgresql":
                    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                frame = pl.read_database(text(query), connection=conn, infer_schema_length=None)
            finally:
                conn.rollback()
    except Exception as exc:  # driver and polars errors alike end up as bad input
        raise InputError(f"{name}: query failed ({_first_line(exc)})") from None
    finally:
        engine.dispose()
    assert isinstance(frame, pl.DataFrame)
    frame = frame.drop(LINE_COLUMN, strict=False).with_row_index(LINE_COLUMN, offset=1)
    frame = frame.with_columns(pl.col(LINE_COLUMN).cast(pl.Int64))
    return Loaded(frame=frame, source=ContactSource(kind="sql", url=url, query=query))


def _sqlite_read_only(parsed: URL, name: str) -> URL:
    """The SQLite URL opening its file read-only (``file:PATH?mode=ro`` URI).

    An in-memory database is left alone: nothing done to it outlives the connection.
    SQLite silently creates a missing database file; a typo must not look like an empty
    contact list, so a missing file is an error.
    """
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return parsed
    query = dict(parsed.query)
    if database.startswith("file:"):
        if query.get("mode") == "memory":
            return parsed
        uri = database
    else:
        db = Path(database)
        if not db.is_file():
            raise InputError(f"{name}: no such database file {db}")
        uri = "file:" + urllib.parse.quote(str(db.absolute()))
    query.update(mode="ro", uri="true")
    return parsed.set(drivername="sqlite+pysqlite", database=uri, query=query)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- CSV: encoding and delimiter ----------------------------------------------------


def _delimiter(value: str) -> str:
    named = DELIMITER_NAMES.get(value.lower() if len(value) > 1 else value, value)
    if len(named) != 1 or named in ('"', "\n", "\r"):
        raise InputError(
            f"contact source: delimiter must be one character (or tab/semicolon/comma/pipe), "
            f"got {value!r}"
        )
    return named


def detect_encoding(data: bytes) -> str:
    """Best guess for the text encoding of ``data`` (a Python codec name)."""
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_at = exc.start
    else:
        return "utf-8"
    # charset-normalizer on a sample: the start and the region of the first bad byte.
    from charset_normalizer import from_bytes

    window = data[:65_536]
    if bad_at > 32_768:
        window += b"\n" + data[max(0, bad_at - 16_384) : bad_at + 49_152]
    matches = list(from_bytes(window))
    if matches:
        best = matches[0]
        best_name = best.encoding
        # Prefer a Western reading when it is about as plausible as the winner:
        # charset-normalizer often names a neighbour (cp1250, cp1258) for Italian text.
        western = [m for m in matches if m.encoding in _WESTERN and m.chaos <= best.chaos + 0.05]
        if best_name not in _WESTERN and not western:
            return str(best_name)
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return "latin-1"
    return "cp1252"


def sniff_delimiter(sample: str) -> str:
    """The candidate delimiter that splits the first lines most consistently."""
    lines = sample.splitlines()[:200]
    best: tuple[float, int, int] = (-1.0, 0, 0)
    chosen = ","
    for rank, cand in enumerate(DELIMITER_CANDIDATES):
        try:
            rows = [r for r in csv.reader(lines, delimiter=cand, quotechar='"') if r]
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        width = len(rows[0])
        body = rows[1:-1] if len(rows) > 2 else rows[1:]  # the sample may cut a record
        consistent = sum(1 for r in body if len(r) == width) / len(body) if body else 1.0
        score = (consistent, width, -rank)
        if score > best:
            best, chosen = score, cand
    return chosen


def _clean_header(names: Sequence[str]) -> list[str]:
    """Strip header names, name the blank ones and make duplicates unique.

    Blank names at the end (a header closed by a delimiter) are dropped: the rows'
    matching empty trailing fields are then tolerated as extra empty fields.
    """
    names = [n.replace("\ufeff", "").strip() for n in names]
    while len(names) > 1 and not names[-1]:
        names.pop()
    seen: dict[str, int] = {}
    out: list[str] = []
    for i, raw in enumerate(names):
        name = raw.replace("\ufeff", "").strip() or f"column_{i + 1}"
        if name == LINE_COLUMN:
            name = f"{LINE_COLUMN}_source"
        base = name
        while name in seen:
            seen[base] += 1
            name = f"{base}_{seen[base]}"
        seen[name] = 1
        out.append(name)
    return out


# --- CSV: parsing -------------------------------------------------------------------


def read_csv(
    path: str | Path,
    *,
    encoding: str | None = None,
    delimiter: str | None = None,
) -> Loaded:
    """Read a delimited text file; see the module docstring for the rules."""
    p = Path(path)
    data = _read_bytes(p)
    if data.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise InputError(
            f"contacts file {p}: this is a spreadsheet workbook (xlsx/xls), not CSV; "
            "export it as CSV first"
        )
    if encoding:
        # The caller chose the encoding: a byte it cannot decode means the choice is wrong,
        # and guessing past it would garble names and addresses silently.
        _check_encoding(encoding, f"contacts file {p}")
        enc = encoding
        text = _decode_strict(data, enc, f"contacts file {p}")
    else:
        enc = detect_encoding(data)
        text = data.decode(enc, errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    delim = _delimiter(delimiter) if delimiter else sniff_delimiter(text[:65_536])
    # One physical line per element; CR LF and lone CR count as line breaks, as in any
    # editor, and quoted values keep a plain LF for each.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    frame, rejected = _parse_lines(lines, delim, str(p))
    source = ContactSource(kind="csv", path=p, encoding=encoding, delimiter=delimiter)
    return Loaded(
        frame=frame,
        rejected=rejected,
        source=source,
        encoding=codecs.lookup(enc).name,
        delimiter=delim,
    )


def _check_encoding(encoding: str, name: str) -> None:
    """One-line ``InputError`` unless ``encoding`` names a text codec."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise InputError(f"{name}: unknown encoding {encoding!r}") from None
    try:
        b"a".decode(encoding)  # refuses codecs that are not text encodings (rot13, hex…)
    except LookupError:
        raise InputError(f"{name}: {encoding!r} is not a text encoding") from None
    except UnicodeDecodeError:
        pass  # a text encoding; one byte just is not a whole character in it


def _decode_strict(data: bytes, encoding: str, name: str) -> str:
    """``data`` decoded with ``encoding``; the first undecodable byte is an ``InputError``
    naming its physical line (CR LF, LF and lone CR end a line, as in the reader)."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode(encoding, errors="replace")
        line = before.count("\n") + before.count("\r") - before.count("\r\n") + 1
        bad = exc.object[exc.start : max(exc.end, exc.start + 1)][:4]
        shown = " ".join(f"0x{b:02x}" for b in bad)
        what = "byte" if len(bad) == 1 else "bytes"
        raise InputError(
            f"{name}: line {line} is not valid {encoding} ({what} {shown}); check --encoding"
        ) from None


def _excerpt(text: str, limit: int = 80) -> str:
    flat = text.replace("\n", "⏎")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _hex_class(ch: str) -> str:
    return f"\\x{{{ord(ch):X}}}"


# Irregular records handled one by one before the rest of the file goes to the csv
# module in one piece (each one costs a vectorised pass over one window of lines).
MAX_IRREGULAR_RECORDS = 1000
WINDOW_LINES = 65_536


@dataclass
class _Facts:
    """Per-line (or per-record) facts computed with polars string kernels."""

    quotes: npt.NDArray[np.int64]
    fields: npt.NDArray[np.int64]
    stray: npt.NDArray[np.bool_]
    trailing: npt.NDArray[np.int64]
    blank: npt.NDArray[np.bool_]


def _facts(texts: list[str], delim: str) -> _Facts:
    """Quote count, field count, irregular quoting, trailing delimiters and blankness.

    The field count takes well-formed quoted fields (the whole field between quotes)
    out first; a quote left over means irregular quoting ("stray"). The regex only runs
    on texts that contain a quote.
    """
    d = _hex_class(delim)
    frame = pl.DataFrame({"t": pl.Series(texts, dtype=pl.String)}).with_columns(
        q=pl.col("t").str.count_matches('"', literal=True).cast(pl.Int64),
        blank=pl.col("t").str.strip_chars(" \t\x0b\x0c\xa0" + delim).str.len_bytes() == 0,
        trailing=(
            pl.col("t").str.len_bytes() - pl.col("t").str.strip_chars_end(delim).str.len_bytes()
        ).cast(pl.Int64),
        fields=(pl.col("t").str.count_matches(delim, literal=True) + 1).cast(pl.Int64),
        stray=pl.lit(False),
    )
    quoted_idx = np.flatnonzero(frame["q"].to_numpy() > 0)
    fields = frame["fields"].to_numpy().copy()
    stray = frame["stray"].to_numpy().copy()
    if len(quoted_idx):
        pair = delim + delim
        doubled = pl.lit(pair) + pl.col("t").str.replace_all(delim, pair, literal=True) + pair
        quoted = frame.select(pl.col("t").gather(pl.Series(quoted_idx))).select(
            doubled.str.replace_all(f'{d}"(?:[^"]|"")*"{d}', pair).alias("s")
        )
        counted = quoted.select(
            (pl.col("s").str.count_matches(delim, literal=True) // 2 - 1).cast(pl.Int64),
            pl.col("s").str.contains('"', literal=True).alias("stray"),
        )
        fields[quoted_idx] = counted["s"].to_numpy()
        stray[quoted_idx] = counted["stray"].to_numpy()
    return _Facts(
        quotes=frame["q"].to_numpy(),
        fields=fields,
        stray=stray.astype(bool),
        trailing=frame["trailing"].to_numpy(),
        blank=frame["blank"].to_numpy().astype(bool),
    )


def _parse_lines(lines: list[str], delim: str, name: str) -> tuple[pl.DataFrame, list[Rejection]]:
    """Vectorised CSV parse of physical ``lines`` (see the module docstring).

    Records are found from the quote parity of each line; well-formed records are
    counted with polars and parsed by polars' reader in one go. An irregular record
    (stray quote, unterminated quote, broken multi-line record) goes to the csv module on
    its own, and the parity is recomputed after it, so one bad quote cannot misalign the
    rest of the file.
    """
    n = len(lines)
    facts = _facts(lines, delim)
    content = np.flatnonzero(~facts.blank)
    if len(content) == 0:
        raise InputError(f"contacts file {name}: the file has no header and no rows")
    h = int(content[0])
    if facts.quotes[h] % 2 or facts.stray[h]:  # a header spanning lines: rare, do it slowly
        return _parse_python(lines, 0, delim, None, name)
    header = _clean_header(next(csv.reader([lines[h]], delimiter=delim)))
    width = len(header)

    keep = np.zeros(n, dtype=bool)  # lines handed to polars
    fast_starts: list[npt.NDArray[np.int64]] = []
    rejected: list[Rejection] = []
    slow_rows: list[list[str]] = []
    slow_lines: list[int] = []
    tail: pl.DataFrame | None = None
    pos = h + 1
    irregular_seen = 0
    record_facts: dict[tuple[int, int], tuple[int, bool, int]] = {}
    while pos < n:
        if irregular_seen >= MAX_IRREGULAR_RECORDS:
            tail, tail_rejected = _parse_python(lines, pos, delim, header, name)
            rejected.extend(tail_rejected)
            break
        # One window of lines at a time, so an irregular record costs a window, not the
        # rest of the file.
        end = min(n, pos + WINDOW_LINES)
        qq = facts.quotes[pos:end]
        before = np.cumsum(qq) - qq
        starts = np.flatnonzero(before % 2 == 0) + pos
        nlines = np.diff(np.append(starts, end))
        fields = facts.fields[starts]
        stray = facts.stray[starts]
        trailing = facts.trailing[starts]
        blank = facts.blank[starts]
        multi = np.flatnonzero((nlines > 1) & (nlines <= MAX_RECORD_LINES))
        # Facts of multi-line records, cached by (first line, line count): after an
        # irregular record most of them keep the same grouping.
        missing = [int(m) for m in multi if (int(starts[m]), int(nlines[m])) not in record_facts]
        if missing:
            keys = [(int(starts[m]), int(nlines[m])) for m in missing]
            joined = _facts(["\n".join(lines[a : a + k]) for a, k in keys], delim)
            for j, key in enumerate(keys):
                record_facts[key] = (
                    int(joined.fields[j]),
                    bool(joined.stray[j]),
                    int(joined.trailing[j]),
                )
        for m in multi:
            fields[m], stray[m], trailing[m] = record_facts[(int(starts[m]), int(nlines[m]))]
            blank[m] = False
        irregular = stray | (nlines > MAX_RECORD_LINES) | ((nlines > 1) & (fields != width))
        if end == n:
            complete = len(starts)
            if (int(before[-1]) + int(qq[-1])) % 2:  # the last record never closes its quote
                irregular[-1] = True
        else:
            # The window's last record may go on in the next window: leave it for then,
            # unless it is the only one (then it runs over the whole window: irregular).
            complete = max(1, len(starts) - 1)
        irregular = irregular[:complete]
        stop = int(np.argmax(irregular)) if irregular.any() else complete

        # Regular records before the first irregular one.
        r_start, r_lines, r_fields = starts[:stop], nlines[:stop], fields[:stop]
        r_content = ~blank[:stop]
        extra = r_fields - width
        ok = r_content & ((extra == 0) | ((extra > 0) & (trailing[:stop] >= extra)))
        for i in np.flatnonzero(r_content & ~ok):
            first = int(r_start[i])
            rejected.append(
                Rejection(
                    first + 1,
                    f"{int(r_fields[i])} fields, expected {width}",
                    _excerpt("\n".join(lines[first : first + int(r_lines[i])])),
                )
            )
        for i in np.flatnonzero(ok & (extra > 0)):  # cut empty trailing fields off
            last = int(r_start[i] + r_lines[i] - 1)
            lines[last] = lines[last][: len(lines[last]) - int(extra[i])]
        keep[r_start[ok & (r_lines == 1)]] = True
        for i in np.flatnonzero(ok & (r_lines > 1)):
            keep[int(r_start[i]) : int(r_start[i] + r_lines[i])] = True
        fast_starts.append(r_start[ok])
        if stop == complete:
            if end == n:
                break
            pos = int(starts[complete])
            continue

        # The irregular record: the csv module decides, then parsing resumes after it.
        irregular_seen += 1
        first = int(starts[stop])
        pos, row, rejection = _python_record(lines, first, delim, width)
        if row is not None:
            slow_rows.append(row)
            slow_lines.append(first + 1)
        if rejection is not None:
            rejected.append(rejection)

    line_numbers = np.concatenate(fast_starts) + 1 if fast_starts else np.zeros(0, np.int64)
    payload = "\n".join(itertools.compress(lines, keep.tolist()))
    frame = _polars_parse(payload, len(line_numbers), pl.Series(line_numbers), header, delim)
    if frame is None:  # polars disagreed with the pre-scan: let the csv module decide
        return _parse_python(lines, 0, delim, None, name)
    if slow_rows or tail is not None:
        parts = [frame, _rows_frame(slow_rows, slow_lines, header)]
        if tail is not None:
            parts.append(tail)
        frame = pl.concat(parts, how="vertical").sort(LINE_COLUMN)
    rejected.sort(key=lambda r: r.line)
    return frame, rejected


def _python_record(
    lines: list[str], first: int, delim: str, width: int
) -> tuple[int, list[str] | None, Rejection | None]:
    """Read the one record starting at line index ``first`` with the csv module.

    Returns where to continue, the row if it is good, and the rejection if not. A bad
    record only costs its first line: parsing resumes on the next one, since a stray
    quote may have swallowed the lines after it.
    """
    feed = (line + "\n" for line in itertools.islice(lines, first, None))
    reader = csv.reader(feed, delimiter=delim, quotechar='"', strict=True)
    try:
        row = next(reader)
    except StopIteration:
        return len(lines), None, None
    except csv.Error as exc:
        return first + 1, None, Rejection(first + 1, f"bad quoting ({exc})", _excerpt(lines[first]))
    span = reader.line_num
    if span > MAX_RECORD_LINES:
        reason = f"unterminated quoted field (runs over {span} lines)"
        return first + 1, None, Rejection(first + 1, reason, _excerpt(lines[first]))
    if len(row) > width and not any(row[width:]):
        row = row[:width]
    if len(row) != width:
        text = _excerpt("\n".join(lines[first : first + span]))
        return first + 1, None, Rejection(first + 1, f"{len(row)} fields, expected {width}", text)
    return first + span, row, None


def _rows_frame(rows: list[list[str]], line_numbers: list[int], header: list[str]) -> pl.DataFrame:
    """Rows parsed in Python as a frame like polars' (empty fields null)."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in header]
    frame = pl.DataFrame(
        {h: pl.Series(h, list(c), dtype=pl.String) for h, c in zip(header, columns, strict=True)},
        schema=dict.fromkeys(header, pl.String),
    )
    frame = frame.with_columns(
        [pl.when(pl.col(h) == "").then(None).otherwise(pl.col(h)).alias(h) for h in header]
    )
    return frame.with_columns(pl.Series(LINE_COLUMN, line_numbers, dtype=pl.Int64))


def _polars_parse(
    payload: str, expected: int, line_numbers: pl.Series, header: list[str], delim: str
) -> pl.DataFrame | None:
    """Parse well-formed records with polars; None when it does not find ``expected`` rows."""
    schema = dict.fromkeys(header, pl.String)
    if expected == 0:
        frame = pl.DataFrame(schema=schema)
    else:
        try:
            frame = pl.read_csv(
                io.BytesIO(payload.encode("utf-8")),
                has_header=False,
                separator=delim,
                quote_char='"',
                schema=schema,
                infer_schema=False,
                truncate_ragged_lines=False,
            )
        except Exception:
            return None
        if frame.height != expected:
            return None
    # A quoted empty field ("") reads as an empty string: make it null like the rest.
    frame = frame.with_columns(
        [pl.when(pl.col(h) == "").then(None).otherwise(pl.col(h)).alias(h) for h in header]
    )
    return frame.with_columns(line_numbers.cast(pl.Int64).alias(LINE_COLUMN))


def _parse_python(
    lines: list[str], start: int, delim: str, header: list[str] | None, name: str
) -> tuple[pl.DataFrame, list[Rejection]]:
    """Parse ``lines[start:]`` with the csv module, resynchronising after bad records.

    A rejected record that spans several lines may be a stray quote swallowing the
    lines after it, so parsing resumes on the line right after its first one.
    """
    rows: list[list[str]] = []
    row_lines: list[int] = []
    rejected: list[Rejection] = []
    width = len(header) if header is not None else 0
    pos = start
    n = len(lines)
    was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived lists: the cyclic GC only slows this down
    try:
        while pos < n:
            feed: Iterator[str] = (line + "\n" for line in itertools.islice(lines, pos, None))
            reader = csv.reader(feed, delimiter=delim, quotechar='"', strict=True)
            consumed = 0
            resync: int | None = None
            while True:
                first = pos + consumed
                try:
                    row = next(reader)
                except StopIteration:
                    pos = n
                    break
                except csv.Error as exc:
                    rejected.append(
                        Rejection(first + 1, f"bad quoting ({exc})", _excerpt(lines[first]))
                    )
                    resync = first + 1
                    break
                span = reader.line_num - consumed
                consumed = reader.line_num
                if not "".join(row).strip():
                    continue
                if header is None:
                    header = _clean_header(row)
                    width = len(header)
                    continue
                if span > MAX_RECORD_LINES:
                    rejected.append(
                        Rejection(
                            first + 1,
                            f"unterminated quoted field (runs over {span} lines)",
                            _excerpt(lines[first]),
                        )
                    )
                    resync = first + 1
                    break
                if len(row) > width and not any(row[width:]):
                    row = row[:width]
                if len(row) != width:
                    rejected.append(
                        Rejection(
                            first + 1,
                            f"{len(row)} fields, expected {width}",
                            _excerpt("\n".join(lines[first : first + span])),
                        )
                    )
                    if span > 1:
                        resync = first + 1
                        break
                    continue
                rows.append(row)
                row_lines.append(first + 1)
            if resync is None:
                break
            pos = resync
    finally:
        if was_enabled:
            gc.enable()
    if header is None:
        raise InputError(f"contacts file {name}: the file has no header and no rows")
    return _rows_frame(rows, row_lines, header), rejected
