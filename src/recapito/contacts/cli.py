"""Command-line entry points of the contacts package.

``demo_data`` is wired by the main CLI as ``recapito demo-data``; ``contacts`` is a
group with ``check``, which loads a source and reports what targeting would make of it.
Both print one line per fact, or a JSON object with ``--json``; bad input ends with a
one-line message and a non-zero exit status.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from recapito.errors import RecapitoError


def _fail(exc: RecapitoError) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command("demo-data")
@click.option(
    "--contacts",
    "count",
    type=click.IntRange(min=0),
    default=10_000,
    show_default=True,
    help="Number of contacts to generate.",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory [default: $RECAPITO_HOME/demo].",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet", "both"]),
    default="both",
    show_default=True,
    help="File format(s) to write.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo_data(count: int, seed: int, out: Path | None, fmt: str, as_json: bool) -> None:
    """Generate synthetic Italian CRM contacts (contacts.csv / contacts.parquet)."""
    from recapito import demo_data as demo
    from recapito.config import home_dir

    started = time.perf_counter()
    target_dir = out if out is not None else home_dir() / "demo"
    try:
        frame = demo.generate(count, seed)
        files: dict[str, str] = {}
        broken: list[str] = []
        if fmt in ("csv", "both"):
            csv_path = target_dir / "contacts.csv"
            broken = demo.write_csv(frame, csv_path, seed=seed)
            files["csv"] = str(csv_path)
        if fmt in ("parquet", "both"):
            pq_path = target_dir / "contacts.parquet"
            demo.write_parquet(frame, pq_path)
            files["parquet"] = str(pq_path)
    except RecapitoError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        raise click.ClickException(f"demo data: cannot write to {target_dir}: {exc}") from None
    elapsed = time.perf_counter() - started
    result: dict[str, Any] = {
        "contacts": count,
        "seed": seed,
        "files": files,
        "broken_csv_rows": len(broken),
        "seconds": round(elapsed, 3),
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    for kind, path in files.items():
        extra = f" ({len(broken)} deliberately broken rows)" if kind == "csv" else ""
        click.echo(f"{kind}: {path}{extra}")
    click.echo(f"{count} contacts, seed {seed}, {elapsed:.2f} s")


@click.group("contacts")
def contacts() -> None:
    """Inspect contact sources."""


@contacts.command("check")
@click.argument("source")
@click.option("--query", default=None, help="SQL query, when SOURCE is a connection URL.")
@click.option("--mapping", default=None, help="field=column,... or a .toml/.json file.")
@click.option("--filter", "filter_text", default=None, help="Filter expression.")
@click.option("--encoding", default=None, help="CSV encoding (detected by default).")
@click.option("--delimiter", default=None, help="CSV delimiter (detected by default).")
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many rejections to list.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(
    source: str,
    query: str | None,
    mapping: str | None,
    filter_text: str | None,
    encoding: str | None,
    delimiter: str | None,
    show: int,
    as_json: bool,
) -> None:
    """Load SOURCE (CSV, Parquet or SQL URL) and report the targeting funnel."""
    from recapito.contacts.sources import ContactSource, load
    from recapito.contacts.targeting import target

    started = time.perf_counter()
    try:
        spec = ContactSource.parse(source, query=query, encoding=encoding, delimiter=delimiter)
        loaded = load(spec)
        result = target(loaded, mapping, filter_text)
    except RecapitoError as exc:
        raise _fail(exc) from None
    elapsed = time.perf_counter() - started
    shown = result.rejected.head(show)
    report: dict[str, Any] = {
        "source": spec.describe(),
        "encoding": loaded.encoding,
        "delimiter": loaded.delimiter,
        "mapping": result.mapping.as_dict(),
        "counts": result.counts,
        "rejections": shown.to_dicts(),
        "seconds": round(elapsed, 3),
    }
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    click.echo(f"source: {report['source']}")
    if loaded.encoding:
        click.echo(f"encoding: {loaded.encoding}, delimiter: {loaded.delimiter!r}")
    mapped = ", ".join(f"{k}={v}" for k, v in report["mapping"].items() if v)
    click.echo(f"mapping: {mapped or '(none)'}")
    for key, value in result.counts.items():
        if value or not key.startswith("rejected_"):
            click.echo(f"{key}: {value}")
    for row in shown.iter_rows(named=True):
        what = row["detail"] or row["address"] or ""
        click.echo(f"line {row['line']}: {row['reason']} {what}".rstrip())
    click.echo(f"{elapsed:.2f} s")
