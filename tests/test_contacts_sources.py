"""Contact sources: CSV dialects and encodings, Parquet, SQL, and bad input."""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from recapito.contacts import sources
from recapito.contacts.sources import ContactSource, Loaded, load, read_csv
from recapito.errors import InputError


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _load(path: Path, **kw: str) -> Loaded:
    return load(ContactSource.from_path(path, **kw))


def test_bom_semicolons_multiline_and_broken_row(tmp_path: Path) -> None:
    text = (
        "id;nome;email;indirizzo\r\n"
        'C1;Mario;mario@x.it;"Via Roma 1\nScala B"\r\n'  # lines 2-3
        'C2;Anna;anna@x.it;"Via Dante; 3"\r\n'  # line 4
        "C3;Rotto;rotto@x.it\r\n"  # line 5: a field short
        'C4;"Luca ""il grande""";luca@x.it;Via Po 2\r\n'  # line 6
        "C5;Extra;extra@x.it;Via Po 3;oops\r\n"  # line 7: a field too many
        "C6;Eva;eva@x.it;Via Po 4\r\n"  # line 8
    )
    path = _write(tmp_path / "crm.csv", b"\xef\xbb\xbf" + text.encode("utf-8"))
    loaded = _load(path)
    assert loaded.delimiter == ";"
    assert loaded.encoding == "utf-8-sig"
    assert loaded.columns == ["id", "nome", "email", "indirizzo"]
    assert loaded.frame["id"].to_list() == ["C1", "C2", "C4", "C6"]
    assert loaded.frame["_line"].to_list() == [2, 4, 6, 8]
    assert loaded.frame["indirizzo"].to_list() == [
        "Via Roma 1\nScala B",
        "Via Dante; 3",
        "Via Po 2",
        "Via Po 4",
    ]
    assert loaded.frame["nome"][2] == 'Luca "il grande"'
    assert [(r.line, r.reason) for r in loaded.rejected] == [
        (5, "3 fields, expected 4"),
        (7, "5 fields, expected 4"),
    ]
    assert loaded.rejected[0].text.startswith("C3;Rotto")
    assert all(dtype == pl.String for c, dtype in loaded.frame.schema.items() if c != "_line")
    assert loaded.frame.schema["_line"] == pl.Int64


def test_windows_1252_detected(tmp_path: Path) -> None:
    text = (
        "id;nome;cognome;citta;nota\r\n"
        "1;José;Niccolò;Forlì;prezzo 10€ già pagato\r\n"
        "2;Renée;Zappalà;Cantù;caffè “buono”\r\n"
    )
    path = _write(tmp_path / "legacy.csv", text.encode("cp1252"))
    loaded = _load(path)
    assert loaded.encoding == "cp1252"
    assert loaded.frame["nome"].to_list() == ["José", "Renée"]
    assert loaded.frame["cognome"].to_list() == ["Niccolò", "Zappalà"]
    assert loaded.frame["nota"].to_list() == ["prezzo 10€ già pagato", "caffè “buono”"]


def test_latin1_file_decodes(tmp_path: Path) -> None:
    text = "id,nome,citta\n1,Nicolò,Forlì\n2,Zoë,Città di Castello\n"
    loaded = _load(_write(tmp_path / "latin.csv", text.encode("latin-1")))
    assert loaded.frame["nome"].to_list() == ["Nicolò", "Zoë"]
    assert loaded.frame["citta"].to_list() == ["Forlì", "Città di Castello"]


def test_invalid_bytes_never_crash(tmp_path: Path) -> None:
    data = b"id;nome\n1;Mario\n" + b"2;Bad\xff\xfe\x81name\n" + b"3;Anna\n"
    loaded = _load(_write(tmp_path / "bad.csv", data))
    assert loaded.frame.height == 3
    assert loaded.frame["nome"][0] == "Mario"
    assert loaded.frame["nome"][2] == "Anna"


@pytest.mark.parametrize(
    ("eol", "quoted_break"),
    [("\r\n", False), ("\n", False), ("\r", False), ("\n", True)],
)
def test_wrong_explicit_encoding_fails_on_the_first_bad_line(
    tmp_path: Path, eol: str, quoted_break: bool
) -> None:
    first = 'C1;"Via Roma 1\nScala B"' if quoted_break else "C1;Via Roma 1"
    rows = ["id;indirizzo", first, "C2;Via Dante 3", "C3;Forlì", "C4;Cantù"]
    path = _write(tmp_path / "legacy.csv", eol.join(rows).encode("cp1252"))
    bad_line = 5 if quoted_break else 4  # physical line: a quoted line break counts
    with pytest.raises(InputError) as caught:
        _load(path, encoding="utf-8")
    assert str(caught.value) == (
        f"contacts file {path}: line {bad_line} is not valid utf-8 (byte 0xec); check --encoding"
    )
    # detected, the same file still reads as Windows-1252; given right, it reads as well
    assert _load(path).frame["indirizzo"][-2:].to_list() == ["Forlì", "Cantù"]
    assert _load(path, encoding="cp1252").frame["indirizzo"][-1] == "Cantù"
    assert read_csv(path, encoding="cp1252").frame.height == 4


def test_wrong_explicit_multibyte_encoding_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "u16.csv", "id;nome\n1;Mario\n".encode("utf-16") + b"\x00\xd8")
    with pytest.raises(
        InputError, match=r"u16\.csv: line 3 is not valid utf-16 \(bytes 0x00 0xd8\)"
    ):
        _load(path, encoding="utf-16")
    # a UTF-8 file read as ASCII: the first non-ASCII byte, on the header line
    path = _write(tmp_path / "utf8.csv", "id;città\n1;Forlì\n".encode())
    with pytest.raises(InputError, match=r"line 1 is not valid ascii \(byte 0xc3\)"):
        read_csv(path, encoding="ascii")


@pytest.mark.parametrize(
    ("encoding", "problem"),
    [("klingon", "unknown encoding 'klingon'"), ("rot13", "'rot13' is not a text encoding")],
)
def test_unusable_encoding_names_are_one_line(tmp_path: Path, encoding: str, problem: str) -> None:
    path = _write(tmp_path / "c.csv", b"id;email\n1;a@x.it\n")
    for make in (
        lambda: ContactSource.from_path(path, encoding=encoding),
        lambda: read_csv(path, encoding=encoding),
    ):
        with pytest.raises(InputError) as caught:
            make()
        assert str(caught.value) == f"contacts file {path}: {problem}"


def test_comma_csv_with_quoted_commas(tmp_path: Path) -> None:
    text = 'id,email,address\n1,a@x.it,"Via Roma 1, int. 3"\n2,b@x.it,Via Po 2\n'
    loaded = _load(_write(tmp_path / "comma.csv", text.encode()))
    assert loaded.delimiter == ","
    assert loaded.encoding == "utf-8"
    assert loaded.frame["address"].to_list() == ["Via Roma 1, int. 3", "Via Po 2"]
    assert loaded.rejected == []


def test_tab_csv(tmp_path: Path) -> None:
    text = "id\temail\tnote\n1\ta@x.it\tuno, due; tre\n2\tb@x.it\t\n"
    loaded = _load(_write(tmp_path / "export.txt", text.encode()))
    assert loaded.delimiter == "\t"
    assert loaded.frame["note"].to_list() == ["uno, due; tre", None]


def test_overrides_encoding_and_delimiter(tmp_path: Path) -> None:
    text = "id|nome\n1|Niccolò\n"
    path = _write(tmp_path / "pipe.csv", text.encode("utf-8"))
    loaded = _load(path, encoding="latin-1", delimiter="pipe")
    assert loaded.delimiter == "|"
    assert loaded.encoding == "iso8859-1"
    assert loaded.frame["nome"][0] == "NiccolÃ²"  # what the user asked for
    with pytest.raises(InputError, match="delimiter"):
        ContactSource.from_path(path, delimiter="::")
    with pytest.raises(InputError, match="unknown encoding"):
        ContactSource.from_path(path, encoding="klingon")


def test_blank_lines_cr_endings_and_trailing_delimiters(tmp_path: Path) -> None:
    text = "id;email;\r\r1;a@x.it;\r;;\r2;b@x.it;;\r3;c@x.it\r"
    loaded = _load(_write(tmp_path / "mac.csv", text.encode()))
    assert loaded.columns == ["id", "email"]
    assert loaded.frame["id"].to_list() == ["1", "2", "3"]
    assert loaded.frame["_line"].to_list() == [3, 5, 6]
    assert loaded.rejected == []
    loaded = _load(_write(tmp_path / "mid.csv", b"id;;email\n1;x;a@x.it\n"))
    assert loaded.columns == ["id", "column_2", "email"]


def test_header_only_gives_no_rows(tmp_path: Path) -> None:
    loaded = _load(_write(tmp_path / "h.csv", b"id;email\n"))
    assert loaded.frame.height == 0
    assert loaded.columns == ["id", "email"]


def test_duplicate_and_blank_header_names(tmp_path: Path) -> None:
    loaded = _load(_write(tmp_path / "d.csv", b"email;Email; ;email;_line\n1;2;3;4;5\n"))
    assert loaded.columns == ["email", "Email", "column_3", "email_2", "_line_source"]


def test_unterminated_quote_rejects_its_line_and_resyncs(tmp_path: Path) -> None:
    text = (
        "id;email;note\n"
        "1;a@x.it;ok\n"  # 2
        '2;b@x.it;"never closed\n'  # 3
        "3;c@x.it;fine\n"  # 4
        '4;d@x.it;"two\nlines"\n'  # 5-6
        "5;e@x.it;last\n"  # 7
    )
    loaded = _load(_write(tmp_path / "q.csv", text.encode()))
    assert loaded.frame["id"].to_list() == ["1", "3", "4", "5"]
    assert loaded.frame["_line"].to_list() == [2, 4, 5, 7]
    assert loaded.frame["note"][2] == "two\nlines"
    assert [r.line for r in loaded.rejected] == [3]


def test_unterminated_quote_at_end_of_file(tmp_path: Path) -> None:
    text = 'id;email\n1;a@x.it\n2;"b@x.it\n'
    loaded = _load(_write(tmp_path / "eof.csv", text.encode()))
    assert loaded.frame["id"].to_list() == ["1"]
    assert [r.line for r in loaded.rejected] == [3]


def test_stray_quote_inside_unquoted_field_is_literal(tmp_path: Path) -> None:
    text = 'id;prodotto;email\n1;monitor 24" full hd;a@x.it\n2;tv;b@x.it\n'
    loaded = _load(_write(tmp_path / "stray.csv", text.encode()))
    assert loaded.frame["prodotto"].to_list() == ['monitor 24" full hd', "tv"]
    assert loaded.rejected == []


@pytest.mark.parametrize("window", [3, 8, 65_536])
@pytest.mark.parametrize("irregular", [False, True])
def test_fast_and_python_paths_agree(
    window: int, irregular: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "WINDOW_LINES", window)
    rows = ["id;nome;indirizzo;nota"]
    for i in range(300):
        addr = f'"Via {i}\nScala {i % 3}"' if i % 7 == 0 else f"Via {i}"
        note = f'"a; b ""{i}"""' if i % 5 == 0 else ("" if i % 4 == 0 else f"n{i}")
        rows.append(f"C{i};Nome {i};{addr};{note}")
        if i % 50 == 0:
            rows.append(f"C{i}bis;broken")
        if irregular and i % 60 == 30:
            rows.append(f'C{i}q;monitor 24" hd;Via Po;x')  # a stray quote, read literally
        if irregular and i == 200:
            rows.append(f'C{i}u;"never closed;Via Po;x')  # an unterminated quote
    lines = "\n".join(rows).split("\n")
    fast, fast_rej = sources._parse_lines(list(lines), ";", "t")
    slow, slow_rej = sources._parse_python(list(lines), 0, ";", None, "t")
    assert fast.equals(slow)
    assert fast_rej == slow_rej
    assert len(fast_rej) == (7 if irregular else 6)
    assert fast.height == (305 if irregular else 300)


def test_many_irregular_records_hand_over_to_csv_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_IRREGULAR_RECORDS", 5)
    rows = ["id;misura"] + [f'{i};{i}" pollici' if i % 2 else f"{i};ok" for i in range(200)]
    rows.insert(150, "broken")
    fast, fast_rej = sources._parse_lines(list(rows), ";", "t")
    slow, slow_rej = sources._parse_python(list(rows), 0, ";", None, "t")
    assert fast.equals(slow) and fast_rej == slow_rej
    assert fast.height == 200 and [r.line for r in fast_rej] == [151]
    assert fast["misura"][1] == '1" pollici'


def test_parquet_keeps_types(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "id": [10, 11],
            "email": ["a@x.it", "b@x.it"],
            "consenso": [True, False],
            "nascita": [date(1980, 1, 2), date(1990, 3, 4)],
        }
    )
    path = tmp_path / "c.parquet"
    frame.write_parquet(path)
    loaded = _load(path)
    assert loaded.source is not None and loaded.source.kind == "parquet"
    assert loaded.frame["_line"].to_list() == [1, 2]
    assert loaded.frame.schema["id"] == pl.Int64
    assert loaded.frame.schema["consenso"] == pl.Boolean
    assert loaded.frame.drop("_line").equals(frame)


def test_parquet_detected_by_magic_and_bad_parquet(tmp_path: Path) -> None:
    path = tmp_path / "export.bin"
    pl.DataFrame({"email": ["a@x.it"]}).write_parquet(path)
    assert ContactSource.from_path(path).kind == "parquet"
    bad = _write(tmp_path / "bad.parquet", b"not parquet at all")
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet file"):
        _load(bad)


def test_sqlite_source(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table clienti (id integer, email text, provincia text)")
        conn.executemany(
            "insert into clienti values (?, ?, ?)",
            [(1, "a@x.it", "MI"), (2, "b@x.it", "RM"), (3, "c@x.it", "MI")],
        )
    url = f"sqlite:///{db}"
    source = ContactSource.parse(url, query="select * from clienti where provincia = 'MI'")
    assert source.kind == "sql"
    loaded = load(source)
    assert loaded.frame["email"].to_list() == ["a@x.it", "c@x.it"]
    assert loaded.frame["_line"].to_list() == [1, 2]
    assert loaded.frame.schema["id"] == pl.Int64
    with pytest.raises(InputError, match="query failed"):
        load(ContactSource.from_sql(url, "select * from missing_table"))
    with pytest.raises(InputError, match="no such database file"):
        load(ContactSource.from_sql(f"sqlite:///{tmp_path / 'nope.db'}", "select 1"))
    assert not (tmp_path / "nope.db").exists()


def test_sql_source_needs_query_and_masks_password() -> None:
    with pytest.raises(InputError, match="needs a query"):
        ContactSource.parse("postgresql://u:secret@db/crm")
    source = ContactSource.from_sql("postgresql://u:secret@db/crm", "select 1")
    assert "secret" not in source.describe()
    assert source.describe() == "postgresql://u:***@db/crm"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.csv", "no such file"),
        (lambda p: _write(p / "empty.csv", b""), "the file is empty"),
        (lambda p: _write(p / "bom-only.csv", b"\xef\xbb\xbf\r\n  \n"), "the file is empty"),
        (lambda p: p, "is a directory"),
    ],
)
def test_unusable_files_name_the_file(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(InputError) as info:
        read_csv(path)
    text = str(info.value)
    assert str(path) in text and message in text
    assert "\n" not in text


def test_workbook_is_refused_with_advice(tmp_path: Path) -> None:
    path = _write(tmp_path / "contatti.csv", b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(InputError, match="spreadsheet workbook"):
        _load(path)


def test_detect_encoding_and_sniff_delimiter() -> None:
    assert sources.detect_encoding(b"\xef\xbb\xbfa;b") == "utf-8-sig"
    assert sources.detect_encoding("a;b\nè".encode()) == "utf-8"
    assert sources.detect_encoding("a;b\nàèìòù €\n".encode("cp1252")) == "cp1252"
    assert sources.detect_encoding("a;b\n".encode("utf-16")) == "utf-16"
    assert sources.sniff_delimiter("a;b;c\n1;2,5;3\n") == ";"
    assert sources.sniff_delimiter('a,b,c\n1,"x;y",3\n') == ","
    assert sources.sniff_delimiter("a\tb\n1\t2\n") == "\t"
    assert sources.sniff_delimiter("email\nx@y.it\n") == ","


def test_utf16_with_bom(tmp_path: Path) -> None:
    text = "id\temail\tnome\r\n1\ta@x.it\tNiccolò\r\n"
    loaded = _load(_write(tmp_path / "excel-unicode.txt", text.encode("utf-16")))
    assert loaded.delimiter == "\t"
    assert loaded.frame["nome"].to_list() == ["Niccolò"]


# --- SQL sources never modify the database ---------------------------------------------

PG_URL = os.environ.get("RECAPITO_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# Queries that must be refused before they reach the database, with what the message says.
WRITING_QUERIES = [
    ("drop table {t}", "starts with DROP"),
    ("DELETE FROM {t}", "starts with DELETE"),
    ("insert into {t} values (9, 'z@x.it')", "starts with INSERT"),
    ("update {t} set email = null", "starts with UPDATE"),
    ("select 1; drop table {t}", "more than one statement"),
    ("select * from {t};\n-- done\n; delete from {t}", "more than one statement"),
    ("with x as (select 1) delete from {t}", "would write to the database (DELETE)"),
    ("/* report */ select * into {t}_copy from {t}", "would write to the database (INTO)"),
    ("select 'it''s", "unterminated string"),
]


def _sqlite_db(tmp_path: Path) -> tuple[str, Path]:
    db = tmp_path / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table clienti (id integer, email text)")
        conn.executemany("insert into clienti values (?, ?)", [(1, "a@x.it"), (2, "b@x.it")])
    conn.close()
    return f"sqlite:///{db}", db


def _sqlite_rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("select * from clienti order by id").fetchall()
    conn.close()
    return rows


@pytest.mark.parametrize(("query", "reason"), WRITING_QUERIES)
def test_sqlite_writing_queries_are_refused(tmp_path: Path, query: str, reason: str) -> None:
    url, db = _sqlite_db(tmp_path)
    sql = query.format(t="clienti")
    with pytest.raises(InputError) as caught:
        ContactSource.from_sql(url, sql)  # refused when the source is described...
    message = str(caught.value)
    assert "\n" not in message and reason in message
    assert message.startswith(f"contact source {url}: ")
    assert " ".join(sql.split())[:20] in message  # the query is named
    with pytest.raises(InputError, match=re.escape(reason)):
        sources.read_sql(url, sql)  # ...and when read directly
    assert _sqlite_rows(db) == [(1, "a@x.it"), (2, "b@x.it")]


@pytest.mark.parametrize(
    "query",
    [
        "drop table clienti",
        "delete from clienti",
        "insert into clienti values (3, 'c@x.it')",
        "update clienti set email = null",
        "with x as (select 1) delete from clienti",
        "select 1; drop table clienti",
    ],
)
def test_sqlite_connection_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """The second line of defence: even a query the checker let through cannot write."""
    url, db = _sqlite_db(tmp_path)
    monkeypatch.setattr(sources, "check_read_query", lambda query, url="": None)
    with pytest.raises(InputError, match="query failed"):
        sources.read_sql(url, query)
    assert _sqlite_rows(db) == [(1, "a@x.it"), (2, "b@x.it")]
    # a URL that asks for read-write SQLite URI mode is opened read-only all the same
    with pytest.raises(InputError, match="readonly database"):
        sources.read_sql(f"sqlite:///file:{db}?mode=rw&uri=true", "delete from clienti")
    assert _sqlite_rows(db) == [(1, "a@x.it"), (2, "b@x.it")]


@pytest.mark.parametrize(
    "query",
    [
        "select * from clienti where email <> 'x;y' order by id;",
        "-- contacts\nselect * from clienti /* ; delete */ order by id",
        "with c as (select * from clienti) select * from c order by id",
        'select "id", email as "update; drop" from clienti order by id',
        "values (1, 'a@x.it'), (2, 'b@x.it')",
        "select * from clienti where email like '%delete%' or id > 0 order by id",
        "select last_update_ok.* from clienti as last_update_ok order by id",
    ],
)
def test_sqlite_reading_queries_still_work(tmp_path: Path, query: str) -> None:
    url, _ = _sqlite_db(tmp_path)
    loaded = load(ContactSource.from_sql(url, query))
    assert loaded.frame.height == 2
    assert loaded.frame.row(0)[1:] == (1, "a@x.it")


@pytest.fixture
def pg_table() -> Iterator[tuple[str, str]]:
    """A schema of our own in the ``test`` database with a ``clienti`` table of two rows."""
    import sqlalchemy as sa

    schema = f"recapito_src_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'create schema "{schema}"'))
        conn.execute(sa.text(f'create table "{schema}".clienti (id integer, email text)'))
        conn.execute(
            sa.text(f"insert into \"{schema}\".clienti values (1, 'a@x.it'), (2, 'b@x.it')")
        )
    try:
        yield PG_URL, f'"{schema}".clienti'
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
        engine.dispose()


def _pg_rows(table: str) -> list[tuple[object, ...]]:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(f"select * from {table} order by id"))]
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(("query", "reason"), WRITING_QUERIES)
def test_postgres_writing_queries_are_refused(
    pg_table: tuple[str, str], query: str, reason: str
) -> None:
    url, table = pg_table
    sql = query.format(t=table)
    with pytest.raises(InputError, match=re.escape(reason)) as caught:
        ContactSource.from_sql(url, sql)
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match=re.escape(reason)):
        sources.read_sql(url, sql)
    assert _pg_rows(table) == [(1, "a@x.it"), (2, "b@x.it")]


@pytest.mark.postgres
def test_postgres_connection_is_read_only(
    pg_table: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, table = pg_table
    loaded = load(ContactSource.from_sql(url, f"(select * from {table} order by id)"))
    assert loaded.frame["email"].to_list() == ["a@x.it", "b@x.it"]
    assert load(ContactSource.from_sql(url, f"table {table}")).frame.height == 2
    flags = load(
        ContactSource.from_sql(
            url,
            "select current_setting('transaction_read_only') as t, "
            "current_setting('default_transaction_read_only') as d",
        )
    )
    assert flags.frame.row(0)[1:] == ("on", "on")
    # The second line of defence: even a query the checker let through cannot write.
    monkeypatch.setattr(sources, "check_read_query", lambda query, url="": None)
    for sql in [
        f"drop table {table}",
        f"delete from {table}",
        f"insert into {table} values (3, 'c@x.it')",
        f"update {table} set email = null",
        f"with d as (delete from {table} returning *) select * from d",
        f"select 1; drop table {table}",
        f"commit; delete from {table}",
    ]:
        with pytest.raises(InputError, match="read-only transaction"):
            sources.read_sql(url, sql)
    assert _pg_rows(table) == [(1, "a@x.it"), (2, "b@x.it")]


def test_postgres_dollar_quotes_and_escape_strings_are_understood() -> None:
    url = "postgresql://u@db/crm"
    ContactSource.from_sql(url, "select $tag$; drop table x; $tag$ as a, E'\\'; delete' as b")
    with pytest.raises(InputError, match="more than one statement"):
        ContactSource.from_sql(url, "select $a$ x $a$; drop table x")
    with pytest.raises(InputError, match="unterminated"):
        ContactSource.from_sql(url, "select $a$; drop table x;")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://crm.example.com/export/contatti.csv", "https://crm.example.com/export"),
        ("http://example.com/c.csv?token=1", "http://example.com/c.csv"),
        ("ftp://mario:segreto@files.example.com/c.csv", "ftp://mario:***@files.example.com"),
        ("HTTPS://EXAMPLE.COM/C.CSV", "HTTPS://EXAMPLE.COM/C.CSV"),
        ("s3://bucket/contatti.parquet", "s3://bucket/contatti.parquet"),
    ],
)
def test_file_urls_are_not_database_urls(url: str, shown: str) -> None:
    scheme = url.split(":", 1)[0].lower()
    expected = (
        f"{scheme}:// URLs are not supported as contact files; "
        "download the file first and give its local path"
    )
    for make in (
        lambda: ContactSource.parse(url),  # no query: not "a database URL needs a query"
        lambda: ContactSource.parse(url, query="select 1"),
        lambda: ContactSource.from_sql(url, "select 1"),
        lambda: sources.read_sql(url, "select 1"),
    ):
        with pytest.raises(InputError) as caught:
            make()
        message = str(caught.value)
        assert message.startswith(f"contact source {shown}") and message.endswith(expected)
        assert "database URL" not in message and "segreto" not in message
        assert "\n" not in message


def test_unknown_database_kind_is_one_clear_line() -> None:
    with pytest.raises(InputError) as caught:
        ContactSource.parse("postgres://u@db/crm", query="select 1")
    assert str(caught.value) == (
        "contact source postgres://u@db/crm: not a database URL (unknown database kind "
        "'postgres'; use e.g. postgresql://… or sqlite:///…)"
    )
    with pytest.raises(InputError, match=r"a database URL needs a query \(--query\)$"):
        ContactSource.parse("postgresql://u@db/crm")
