"""Declarative visibility of named blocks: ``visible_if`` in ``template.toml``.

Template authors mark a part of the body with a Jinja block and give its condition in
``template.toml``, in the same filter language as ``campaign run --filter``
(``recapito.contacts.filters``)::

    [blocks.promo]
    visible_if = 'segmento = "private" and provincia in ("MI", "RM")'

    body.html:   {% block promo %}<div>…offerta riservata…</div>{% endblock %}
    body.mjml:   {% block promo %}<mj-section>…</mj-section>{% endblock %}

A block with a condition is shown only to the contacts the filter selects (the same
contacts ``--filter`` would keep: text compared without case and surrounding spaces, a
missing value matching no comparison...). Blocks without a ``[blocks.NAME]`` entry are
always shown; an entry naming no block in the template is an error. ``{% if %}`` remains
available for conditions written in Jinja.

At load time each conditional ``{% block %}`` node becomes ``{% if <flag> %}`` in the
compiled template (blocks without a condition become their plain content: there is no
template inheritance here). The flag is computed per contact by the filter module's own
compiler and evaluator (a polars expression over the contact's values), cached on the
values of the columns the condition reads: a campaign has few distinct combinations of
segment and province, so nearly every message is a dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from jinja2 import nodes

from recapito.contacts.filters import FilterError, compile_filter, tokenize
from recapito.contacts.mapping import header_key
from recapito.errors import TemplateError

FLAG_PREFIX = "_rc_visible_"
_CACHE_LIMIT = 4096


@dataclass
class BlockCondition:
    name: str
    text: str
    columns: frozenset[str]  # the names the condition reads, folded like the filter does
    _cache: dict[tuple[Any, ...], bool] = field(default_factory=dict, repr=False)
    _reads: dict[str, bool] = field(default_factory=dict, repr=False)  # key -> read?

    @property
    def flag(self) -> str:
        return FLAG_PREFIX + self.name

    def evaluate(self, context: Mapping[str, Any], template: str) -> bool:
        reads = self._reads
        items = []
        for key, value in context.items():
            wanted = reads.get(key)
            if wanted is None:
                wanted = reads[key] = header_key(key) in self.columns
            if wanted:
                items.append((key, value))
        return self._lookup(tuple(items), template)

    def _lookup(self, items: tuple[tuple[str, Any], ...], template: str) -> bool:
        try:
            return self._cache[items]
        except KeyError:
            pass
        except TypeError:  # an unhashable value (a list from a database column)
            return self._compute(items, template)
        result = self._compute(items, template)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[items] = result
        return result

    def _compute(self, items: tuple[tuple[str, Any], ...], template: str) -> bool:
        row = {key: [value] for key, value in items}
        try:
            frame = pl.DataFrame(row, strict=False)
            expr = compile_filter(self.text, frame.schema)
            return bool(frame.select(expr).item())
        except FilterError as exc:
            raise TemplateError(f"template {template!r}: block {self.name!r} {exc}") from None
        except pl.exceptions.PolarsError as exc:
            raise TemplateError(
                f"template {template!r}: block {self.name!r}: cannot evaluate visible_if "
                f"({str(exc).splitlines()[0]})"
            ) from None

    def check(self, columns: Iterable[str], template: str) -> None:
        """The condition compiles against these contact columns (unknown column: error)."""
        try:
            compile_filter(self.text, list(columns))
        except FilterError as exc:
            raise TemplateError(f"template {template!r}: block {self.name!r} {exc}") from None


def parse_blocks(meta: Mapping[str, Any], template: str) -> dict[str, BlockCondition]:
    """The ``[blocks.NAME]`` tables of ``template.toml``."""
    table = meta.get("blocks", {})
    if not isinstance(table, dict):
        raise TemplateError(f"template {template!r}: 'blocks' must be a table of [blocks.NAME]")
    out: dict[str, BlockCondition] = {}
    for name, spec in table.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("visible_if"), str):
            raise TemplateError(
                f"template {template!r}: [blocks.{name}] needs visible_if = '<filter>'"
            )
        unknown = sorted(set(spec) - {"visible_if"})
        if unknown:
            raise TemplateError(
                f"template {template!r}: [blocks.{name}]: unknown key {unknown[0]!r}"
            )
        if not name.isidentifier():
            raise TemplateError(f"template {template!r}: block name {name!r} is not a name")
        text = spec["visible_if"]
        try:
            tokens = tokenize(text)
            # parse once against the names it uses, so a syntax error shows at load time
            names = [str(t.value) for t in tokens if t.kind == "name"]
            compile_filter(text, list(dict.fromkeys(names)))
        except FilterError as exc:
            raise TemplateError(f"template {template!r}: block {name!r} {exc}") from None
        out[name] = BlockCondition(name, text, frozenset(header_key(n) for n in names))
    return out


def apply_blocks(ast: nodes.Template, conditions: Mapping[str, BlockCondition]) -> set[str]:
    """Turn ``{% block %}`` nodes into conditional or plain content, in place; returns
    the names of the blocks found."""
    found: set[str] = set()

    def rewrite(body: list[nodes.Node]) -> list[nodes.Node]:
        out: list[nodes.Node] = []
        for node in body:
            for attr in ("body", "else_", "elif_"):
                children = getattr(node, attr, None)
                if isinstance(children, list):
                    setattr(node, attr, rewrite(children))
            if isinstance(node, nodes.Block):
                found.add(node.name)
                condition = conditions.get(node.name)
                if condition is None:
                    out.extend(node.body)
                else:
                    test = nodes.Name(condition.flag, "load", lineno=node.lineno)
                    out.append(nodes.If(test, node.body, [], [], lineno=node.lineno))
            else:
                out.append(node)
        return out

    ast.body = rewrite(ast.body)
    return found
