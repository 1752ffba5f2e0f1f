"""A small, safe filter language compiled to polars expressions.

Nothing is evaluated as Python: the text is tokenised and parsed here, and the result is
a polars expression over the contact columns. Grammar (keywords are case-insensitive)::

    filter     := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" or_expr ")" | predicate
    predicate  := column ( ("=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">=") value
                         | ["not"] "in" "(" value ("," value)* ")"
                         | ["not"] ("contains" | "startswith" | "endswith") value
                         | "is" ["not"] "empty"
                         | <nothing>              -- the column is true
                         )
    value      := 'text' | "text" | number | true | false
    column     := name | `any name in backticks`

Example: ``consenso_email = true and provincia in ("MI", "RM") and segmento != "business"``

Meaning, chosen for campaign lists rather than for SQL purists:

* text comparisons ignore surrounding spaces and case (``citta = "milano"`` matches
  ``Milano``); ``contains``/``startswith``/``endswith`` likewise;
* ``= true`` / ``= false`` on a text column reads boolean-like words: true is one of
  true, 1, sì, si, s, yes, y, vero, x, t, on; false is false, 0, no, n, falso, f, off.
  A bare column (``consenso_sms``) means ``consenso_sms = true``;
* comparing with a number reads the column as a number (a decimal comma is accepted);
  values that are not numbers never match;
* a missing value (null, or only spaces) matches no comparison, so ``!=`` and
  ``not in`` include it: ``segmento != "business"`` keeps contacts with no segment.
  ``is empty`` / ``is not empty`` test for it explicitly.

Errors are ``FilterError`` (an ``InputError``) with the 1-based character position and
what was expected there.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from recapito.contacts.mapping import header_key
from recapito.contacts.sources import LINE_COLUMN
from recapito.errors import InputError

TRUE_WORDS = ("true", "1", "sì", "si", "s", "yes", "y", "vero", "x", "t", "on")
FALSE_WORDS = ("false", "0", "no", "n", "falso", "f", "off")
KEYWORDS = frozenset(
    {"and", "or", "not", "in", "contains", "startswith", "endswith", "is", "empty", "true", "false"}
)
COMPARISONS = {
    "=": "=",
    "==": "=",
    "!=": "!=",
    "<>": "!=",
    "<": "<",
    "<=": "<=",
    ">": ">",
    ">=": ">=",
}
_NUMERIC = (
    pl.Int8,
    pl.Int16,
    pl.Int32,
    pl.Int64,
    pl.UInt8,
    pl.UInt16,
    pl.UInt32,
    pl.UInt64,
    pl.Float32,
    pl.Float64,
)


class FilterError(InputError):
    """A filter that does not parse or names an unknown column."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class Token:
    kind: str  # name, string, number, op, lparen, rparen, comma, keyword, end
    text: str
    pos: int  # 1-based
    value: Any = None


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>-?\d+(?:\.\d+)?(?![\w.]))
  | (?P<op>==|!=|<>|<=|>=|=|<|>)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<name>[^\W\d]\w*)
    """,
    re.VERBOSE,
)


def _describe(tok: Token) -> str:
    return "end of input" if tok.kind == "end" else repr(tok.text)


def tokenize(text: str) -> list[Token]:
    """Split filter text into tokens; raises ``FilterError`` on a stray character."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "'\"`":
            j = i + 1
            buf: list[str] = []
            while j < len(text) and text[j] != ch:
                if text[j] == "\\" and j + 1 < len(text):
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= len(text):
                what = "column name" if ch == "`" else "string"
                raise FilterError(
                    f"filter: unterminated {what} starting at position {i + 1}", i + 1
                )
            kind = "name" if ch == "`" else "string"
            tokens.append(Token(kind, text[i : j + 1], i + 1, "".join(buf)))
            i = j + 1
            continue
        m = _TOKEN_RE.match(text, i)
        if m is None:
            raise FilterError(f"filter: unexpected character {ch!r} at position {i + 1}", i + 1)
        kind = m.lastgroup or ""
        word = m.group()
        if kind == "number":
            tokens.append(Token("number", word, i + 1, float(word) if "." in word else int(word)))
        elif kind == "name" and word.lower() in KEYWORDS:
            tokens.append(Token("keyword", word, i + 1, word.lower()))
        elif kind == "name":
            tokens.append(Token("name", word, i + 1, word))
        elif kind != "ws":
            tokens.append(Token(kind, word, i + 1, word))
        i = m.end()
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    def __init__(
        self,
        text: str,
        schema: Mapping[str, pl.DataType],
        shown: Sequence[str],
        canonical: Sequence[str] = (),
    ) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.schema = schema
        self.shown = list(shown)
        self.canonical = [c for c in canonical if c not in self.shown]
        self.folded: dict[str, list[str]] = {}
        for name in schema:
            self.folded.setdefault(header_key(name), []).append(name)

    # token helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def is_keyword(self, *words: str) -> bool:
        return self.tok.kind == "keyword" and self.tok.value in words

    def fail(self, expected: str, tok: Token | None = None) -> FilterError:
        t = tok or self.tok
        return FilterError(
            f"filter: expected {expected} at position {t.pos}, found {_describe(t)}", t.pos
        )

    # grammar
    def parse(self) -> pl.Expr:
        if self.tok.kind == "end":
            raise self.fail("a condition")
        expr = self.or_expr()
        if self.tok.kind != "end":
            raise self.fail("'and', 'or' or the end of the filter")
        return expr

    def or_expr(self) -> pl.Expr:
        expr = self.and_expr()
        while self.is_keyword("or"):
            self.advance()
            expr = expr | self.and_expr()
        return expr

    def and_expr(self) -> pl.Expr:
        expr = self.not_expr()
        while self.is_keyword("and"):
            self.advance()
            expr = expr & self.not_expr()
        return expr

    def not_expr(self) -> pl.Expr:
        if self.is_keyword("not"):
            self.advance()
            return ~self.not_expr()
        if self.tok.kind == "lparen":
            self.advance()
            expr = self.or_expr()
            if self.tok.kind != "rparen":
                raise self.fail("')'")
            self.advance()
            return expr
        return self.predicate()

    def column(self) -> tuple[str, pl.DataType]:
        tok = self.tok
        if tok.kind != "name":
            raise self.fail("a column name, 'not' or '('")
        self.advance()
        name = str(tok.value)
        if name in self.schema:
            return name, self.schema[name]
        candidates = self.folded.get(header_key(name), [])
        if len(candidates) == 1:
            return candidates[0], self.schema[candidates[0]]
        close = difflib.get_close_matches(name, self.shown + self.canonical, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        available = ", ".join(self.shown) or "(none)"
        also = f"; canonical: {', '.join(self.canonical)}" if self.canonical else ""
        raise FilterError(
            f"filter: unknown column {name!r} at position {tok.pos}{hint}; "
            f"available: {available}{also}",
            tok.pos,
        )

    def value(self) -> Any:
        tok = self.tok
        if tok.kind in ("string", "number"):
            self.advance()
            return tok.value
        if self.is_keyword("true", "false"):
            self.advance()
            return tok.value == "true"
        raise self.fail("a value (a quoted text, a number, true or false)")

    def predicate(self) -> pl.Expr:
        name, dtype = self.column()
        col = pl.col(name)
        tok = self.tok
        if tok.kind == "op":
            self.advance()
            op = COMPARISONS[tok.text]
            value_tok = self.tok
            value = self.value()
            if isinstance(value, bool) and op not in ("=", "!="):
                raise FilterError(
                    f"filter: true/false can only follow = or != (position {value_tok.pos})",
                    value_tok.pos,
                )
            return _compare(col, dtype, op, value)
        negate = False
        if self.is_keyword("not"):
            self.advance()
            negate = True
            if not self.is_keyword("in", "contains", "startswith", "endswith"):
                raise self.fail("'in', 'contains', 'startswith' or 'endswith' after 'not'")
        if self.is_keyword("in"):
            self.advance()
            if self.tok.kind != "lparen":
                raise self.fail("'(' after 'in'")
            self.advance()
            values = [self.value()]
            while self.tok.kind == "comma":
                self.advance()
                values.append(self.value())
            if self.tok.kind != "rparen":
                raise self.fail("',' or ')' in the list of values")
            self.advance()
            expr = _in(col, dtype, values)
            return ~expr if negate else expr
        if self.is_keyword("contains", "startswith", "endswith"):
            op = str(self.advance().value)
            target = self.tok
            value = self.value()
            if isinstance(value, bool):
                raise self.fail("a text or a number", target)
            expr = _text_match(col, dtype, op, str(value))
            return ~expr if negate else expr
        if self.is_keyword("is"):
            self.advance()
            negate = False
            if self.is_keyword("not"):
                self.advance()
                negate = True
            if not self.is_keyword("empty"):
                raise self.fail("'empty' after 'is'" if not negate else "'empty' after 'is not'")
            self.advance()
            expr = _is_empty(col, dtype)
            return ~expr if negate else expr
        if tok.kind in ("end", "rparen") or self.is_keyword("and", "or"):
            return _compare(col, dtype, "=", True)
        raise self.fail(
            "a comparison (=, !=, <, <=, >, >=), 'in', 'not in', 'contains', 'startswith', "
            "'endswith' or 'is empty'"
        )


def _is_text(dtype: pl.DataType) -> bool:
    return dtype == pl.String or dtype == pl.Categorical or dtype == pl.Null


def _is_number(dtype: pl.DataType) -> bool:
    return any(dtype == t for t in _NUMERIC)


def _as_text(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """The column as trimmed lowercase text (null when blank)."""
    text = col if dtype == pl.String else col.cast(pl.String)
    text = text.str.strip_chars().str.to_lowercase()
    return pl.when(text == "").then(None).otherwise(text)


def _as_number(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if _is_number(dtype):
        return col.cast(pl.Float64)
    if dtype == pl.Boolean:
        return col.cast(pl.Float64)
    text = col.cast(pl.String).str.strip_chars().str.replace(",", ".", literal=True)
    return text.cast(pl.Float64, strict=False)


def _as_bool(col: pl.Expr, dtype: pl.DataType, wanted: bool) -> pl.Expr:
    if dtype == pl.Boolean:
        return col == wanted
    if _is_number(dtype):
        return (col != 0) if wanted else (col == 0)
    words = list(TRUE_WORDS if wanted else FALSE_WORDS)
    return _as_text(col, dtype).is_in(words)


def _compare(col: pl.Expr, dtype: pl.DataType, op: str, value: Any) -> pl.Expr:
    if op == "!=":
        return ~_compare(col, dtype, "=", value)
    if isinstance(value, bool):
        expr = _as_bool(col, dtype, value)
    elif isinstance(value, int | float):
        left = _as_number(col, dtype)
        expr = _apply(op, left, pl.lit(float(value)))
    else:
        text = str(value)
        if dtype == pl.Boolean:
            lowered = text.strip().lower()
            if lowered in TRUE_WORDS or lowered in FALSE_WORDS:
                expr = _as_bool(col, dtype, lowered in TRUE_WORDS)
                return expr.fill_null(False) if op == "=" else pl.lit(False)
        expr = _apply(op, _as_text(col, dtype), pl.lit(text.strip().lower()))
    return expr.fill_null(False)


def _apply(op: str, left: pl.Expr, right: pl.Expr) -> pl.Expr:
    if op == "=":
        return left == right
    if op == "<":
        return left < right
    if op == "<=":
        return left <= right
    if op == ">":
        return left > right
    return left >= right


def _in(col: pl.Expr, dtype: pl.DataType, values: Sequence[Any]) -> pl.Expr:
    # Text values on a text column: one vectorised lookup; anything else value by value.
    text_column = _is_text(dtype)
    texts = [v for v in values if isinstance(v, str) and text_column]
    others = [v for v in values if not (isinstance(v, str) and text_column)]
    parts: list[pl.Expr] = []
    if texts:
        parts.append(
            _as_text(col, dtype).is_in([t.strip().lower() for t in texts]).fill_null(False)
        )
    parts.extend(_compare(col, dtype, "=", v) for v in others)
    expr = parts[0]
    for part in parts[1:]:
        expr = expr | part
    return expr


def _text_match(col: pl.Expr, dtype: pl.DataType, op: str, value: str) -> pl.Expr:
    text = _as_text(col, dtype)
    needle = value.lower()
    if op == "contains":
        expr = text.str.contains(needle, literal=True)
    elif op == "startswith":
        expr = text.str.starts_with(needle)
    else:
        expr = text.str.ends_with(needle)
    return expr.fill_null(False)


def _is_empty(col: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    return _as_text(col, dtype).is_null()


def _schema_of(columns: Mapping[str, pl.DataType] | Sequence[str]) -> dict[str, pl.DataType]:
    if isinstance(columns, Mapping):
        return dict(columns)
    return {name: pl.String() for name in columns}


def compile_filter(
    text: str,
    columns: Mapping[str, pl.DataType] | Sequence[str] | pl.Schema,
    *,
    shown: Sequence[str] | None = None,
    canonical: Sequence[str] = (),
) -> pl.Expr:
    """Compile filter text to a Boolean polars expression over ``columns``.

    ``columns`` is a schema (name → dtype, e.g. ``frame.schema``) or a list of names,
    taken as text columns. The expression is never null: rows that do not match are false.

    An unknown column is a ``FilterError`` listing the columns the user can filter on:
    ``shown`` (default: every column but the loader's ``_line``), then ``canonical``
    ones under their own heading. Columns left out of both still work in a filter; they
    are only not advertised.
    """
    schema = _schema_of(columns)
    listed = [c for c in schema if c != LINE_COLUMN] if shown is None else list(shown)
    return _Parser(text, schema, listed, canonical).parse().alias("_filter")


def apply_filter(frame: pl.DataFrame, text: str | None) -> pl.DataFrame:
    """Rows of ``frame`` matching the filter (all rows when ``text`` is empty)."""
    if text is None or not text.strip():
        return frame
    return frame.filter(compile_filter(text, frame.schema))
