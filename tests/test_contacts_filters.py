"""The filter language: what it matches and how it reports mistakes."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pytest

from recapito.contacts.filters import FilterError, apply_filter, compile_filter, tokenize
from recapito.contacts.sources import ContactSource, load
from recapito.contacts.targeting import target
from recapito.errors import InputError

FRAME = pl.DataFrame(
    {
        "id": ["1", "2", "3", "4", "5", "6"],
        "consenso_email": ["sì", "no", "TRUE", None, "1", "vero"],
        "provincia": ["MI", "rm", "TO", "MI", None, " RM "],
        "segmento": ["retail", "business", None, "private", "retail", "Business"],
        "eta": ["30", "41,5", "x", None, "18", "65"],
        "città": ["Milano", "Roma", "Torino", "Milano", "", "Roma"],
        "Codice Fiscale": ["A", "B", "C", "D", "E", "F"],
    }
)


def ids(text: str, frame: pl.DataFrame = FRAME) -> list[str]:
    return apply_filter(frame, text)["id"].to_list()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'consenso_email = true and provincia in ("MI", "RM") and segmento != "business"',
            ["1"],
        ),
        ("consenso_email", ["1", "3", "5", "6"]),
        ("consenso_email = true", ["1", "3", "5", "6"]),
        ("consenso_email = false", ["2"]),
        ("consenso_email != true", ["2", "4"]),
        ("not consenso_email", ["2", "4"]),
        ('provincia = "mi"', ["1", "4"]),
        ("provincia = 'RM'", ["2", "6"]),
        ('provincia != "MI"', ["2", "3", "5", "6"]),
        ('provincia not in ("MI", "RM")', ["3", "5"]),
        ("eta > 20", ["1", "2", "6"]),
        ("eta >= 41.5", ["2", "6"]),
        ("eta < 20", ["5"]),
        ("eta = 30", ["1"]),
        ("città is empty", ["5"]),
        ("citta is not empty", ["1", "2", "3", "4", "6"]),
        ("segmento is empty or provincia is empty", ["3", "5"]),
        ('città startswith "mil"', ["1", "4"]),
        ('città endswith "NO"', ["1", "3", "4"]),
        ('segmento contains "SIN"', ["2", "6"]),
        ('segmento not contains "a"', ["2", "3", "6"]),
        ('provincia = "MI" or provincia = "TO" and segmento = "retail"', ["1", "4"]),
        ('(provincia = "MI" or provincia = "TO") and segmento = "retail"', ["1"]),
        ('not (provincia = "MI" or provincia = "RM")', ["3", "5"]),
        ('`Codice Fiscale` in ("A", "F")', ["1", "6"]),
        ('CONSENSO_EMAIL AND Provincia IN ("mi")', ["1"]),
        ('segmento < "c"', ["2", "6"]),
    ],
)
def test_filters_match(text: str, expected: list[str]) -> None:
    assert ids(text) == expected


def test_native_types() -> None:
    frame = pl.DataFrame(
        {
            "id": ["a", "b", "c"],
            "ok": [True, False, None],
            "n": [1, 5, None],
            "born": [date(1970, 1, 1), date(1990, 6, 1), None],
        }
    )
    assert ids("ok = true", frame) == ["a"]
    assert ids("ok = false", frame) == ["b"]
    assert ids("not ok", frame) == ["b", "c"]
    assert ids('ok = "sì"', frame) == ["a"]
    assert ids("n >= 2", frame) == ["b"]
    assert ids("n in (1, 3)", frame) == ["a"]
    assert ids("n is empty", frame) == ["c"]
    assert ids('born < "1980-01-01"', frame) == ["a"]


def test_never_evaluates_python() -> None:
    with pytest.raises(FilterError):
        compile_filter("__import__('os').system('true')", FRAME.schema)


def test_column_names_only_list() -> None:
    expr = compile_filter('provincia = "MI"', ["provincia"])
    assert pl.DataFrame({"provincia": ["MI", "RM"]}).filter(expr).height == 1


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("provincia = ", 13, "expected a value"),
        ('provincia in "MI"', 14, "expected '(' after 'in'"),
        ('provincia in ("MI" "RM")', 20, "expected ',' or ')'"),
        ('provincia = "MI" and', 21, "expected a column name"),
        ('(provincia = "MI"', 18, "expected ')'"),
        ('provincia = "MI")', 17, "expected 'and', 'or' or the end"),
        ("provincia is", 13, "expected 'empty' after 'is'"),
        ("provincia is not full", 18, "expected 'empty' after 'is not'"),
        ("provincia < true", 13, "true/false can only follow = or !="),
        ("provincia ~ 3", 11, "unexpected character '~'"),
        ('provincia = "MI', 13, "unterminated string"),
        ('provincia "MI"', 11, "expected a comparison"),
        ("", 1, "expected a condition"),
        ('provinca = "MI"', 1, "unknown column 'provinca'"),
        ('segmento = "x" and provincia2 = "MI"', 20, "unknown column 'provincia2'"),
        ("provincia not = 3", 15, "expected 'in', 'contains'"),
    ],
)
def test_errors_name_position_and_expectation(text: str, position: int, fragment: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(text, FRAME.schema)
    assert info.value.position == position
    assert fragment in str(info.value)
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value)


def test_unknown_column_suggests_and_lists() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter('provinca = "MI"', FRAME.schema)
    message = str(info.value)
    assert "did you mean 'provincia'?" in message
    assert "available: id, consenso_email, provincia" in message


def test_tokenize_positions() -> None:
    toks = tokenize('a = "x y" and b in (1, -2.5)')
    assert [(t.kind, t.pos) for t in toks] == [
        ("name", 1),
        ("op", 3),
        ("string", 5),
        ("keyword", 11),
        ("name", 15),
        ("keyword", 17),
        ("lparen", 20),
        ("number", 21),
        ("comma", 22),
        ("number", 24),
        ("rparen", 28),
        ("end", 29),
    ]
    assert toks[9].value == -2.5


def test_empty_filter_keeps_everything() -> None:
    assert apply_filter(FRAME, None).height == FRAME.height
    assert apply_filter(FRAME, "   ").height == FRAME.height


def test_unknown_column_lists_only_the_users_columns(tmp_path: Path) -> None:
    """Internal columns (``_line``, ``dedupe_key``) are not offered as filter columns."""
    path = tmp_path / "c.csv"
    path.write_text(
        "id;nome;email;provincia;city\n1;Mario;m@x.it;MI;Milano\n2;Anna;a@x.it;RM;Roma\n",
        encoding="utf-8",
    )
    loaded = load(ContactSource.from_path(path))
    with pytest.raises(FilterError) as info:
        target(loaded, None, 'provinca = "MI"')
    assert str(info.value) == (
        "filter: unknown column 'provinca' at position 1 (did you mean 'provincia'?); "
        "available: id, nome, email, provincia, city; "
        "canonical: contact_id, email_domain, first_name, province"
    )
    # a source column clashing with a canonical name it does not feed is listed renamed
    with pytest.raises(FilterError) as info:
        target(loaded, "city=provincia", "zzz")
    assert "available: id, nome, email, provincia, city_source; canonical: " in str(info.value)
    # not advertised, but still usable
    kept = target(loaded, None, "_line = 3 or dedupe_key = 'm@x.it'").audience
    assert sorted(kept["id"].to_list()) == ["1", "2"]
    # straight on the loaded frame: everything but _line
    with pytest.raises(FilterError) as info:
        apply_filter(loaded.frame, "zzz")
    assert str(info.value).endswith("available: id, nome, email, provincia, city")


def test_unknown_column_lists_what_it_is_told() -> None:
    with pytest.raises(FilterError) as info:
        compile_filter("eta2 > 3", FRAME.schema, shown=["eta"], canonical=["eta", "email"])
    assert str(info.value) == (
        "filter: unknown column 'eta2' at position 1 (did you mean 'eta'?); "
        "available: eta; canonical: email"
    )
    with pytest.raises(FilterError, match=r"available: \(none\)$"):
        compile_filter("x", {"_line": pl.Int64()})
