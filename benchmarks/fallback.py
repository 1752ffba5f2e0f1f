"""Fallback channels' throughput: paper letters per second, and SMS requests per second.

    .venv/bin/python benchmarks/fallback.py [--letters N] [--baseline N] [--sms N] [--json]

Letters: ``recapito.fallback.paper.render_letters`` end to end (address validation, body
template, Typst compile, PDF and manifest files written 0600) on N synthetic Italian letters:

- ``batch``: one PDF for all letters (the print-house mode): ``pdfs_per_s`` (letters per
  second, wall clock) and ``pdfs_per_cpu_s`` (letters per CPU second of this process, i.e.
  per core, since Typst may lay out on several threads); target ≥ 100 per core;
- ``single``: one PDF per letter, one Typst compiler reused (fonts loaded once);
- ``baseline``: one fresh ``typst.compile`` per letter (what a naive per-letter renderer
  does: the compiler and its fonts set up for every PDF), same template and data.

SMS: requests per second through ``recapito.fallback.sms.TwilioSms`` (the twilio SDK, no
retries) against the sandbox's Twilio-compatible Messages API on 127.0.0.1
(``recapito.sandbox.twilio``), sequential, without status callbacks; when that sandbox or the
SDK is not installed, ``sms_per_s`` is null and ``sms_note`` says why.

``--json`` prints one object: ``pdfs_per_s``, ``pdfs_per_cpu_s``, ``single_pdfs_per_s``,
``baseline_pdfs_per_s``, ``speedup_vs_baseline``, ``sms_per_s``, counts and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from recapito.fallback.paper import (  # noqa: E402
    _TYPST,
    Letter,
    PaperOptions,
    _prepare,
    render_letters,
)

OPTIONS = PaperOptions(on=date(2026, 12, 4))
CITIES = [
    ("20121", "Milano", "MI"),
    ("00184", "Roma", "RM"),
    ("80133", "Napoli", "NA"),
    ("10121", "Torino", "TO"),
    ("47121", "Forlì", "FC"),
    ("90133", "Palermo", "PA"),
]
NAMES = ["Mario Rossi", "Giulia Bianchi", "Luca Esposito", "Chiara Ricci", "Niccolò Galli"]


def letters(n: int) -> list[Letter]:
    out = []
    for i in range(n):
        cap, city, prov = CITIES[i % len(CITIES)]
        out.append(
            Letter(
                letter_id=f"bench-{i}",
                recipient=NAMES[i % len(NAMES)],
                lines=[f"Via Giuseppe Garibaldi {i % 200 + 1}"],
                postcode=cap,
                city=city,
                province=prov,
                product="raccomandata" if i % 10 == 0 else "posta4",
                variables={"first_name": NAMES[i % len(NAMES)].split()[0]},
            )
        )
    return out


def _timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_letters(n: int, n_single: int, n_baseline: int) -> dict[str, Any]:
    import typst

    batch = letters(n)
    with tempfile.TemporaryDirectory(prefix="recapito-bench-") as tmp:
        render_letters(batch[:20], Path(tmp) / "warm", batch=True, options=OPTIONS)  # warm-up
        manifest, wall, cpu = _timed(
            lambda: render_letters(batch, Path(tmp) / "batch", batch=True, options=OPTIONS)
        )
        assert len(manifest.letters) == n, manifest.rejected[:3]
        pages = manifest.pages
        batch_bytes = sum(p.stat().st_size for p in manifest.files)
        single, s_wall, _ = _timed(
            lambda: render_letters(
                batch[:n_single], Path(tmp) / "single", batch=False, options=OPTIONS
            )
        )
        assert len(single.letters) == n_single

        # baseline: a fresh compile per letter (same template, same data, same fonts)
        source = Path(tmp) / "letter.typ"
        source.write_text(_TYPST, encoding="utf-8")
        compiled = OPTIONS.template.compiled()
        payloads = []
        for letter in batch[:n_baseline]:
            prepared = _prepare(letter, OPTIONS, compiled)
            assert not isinstance(prepared, list)
            payloads.append(
                json.dumps(
                    {
                        "window": asdict(OPTIONS.window),
                        "title": letter.letter_id,
                        "author": OPTIONS.sender.name,
                        "letters": [prepared.data],
                    }
                )
            )

        def baseline() -> None:
            for i, data in enumerate(payloads):
                pdf = typst.compile(
                    str(source), sys_inputs={"data": data}, ignore_system_fonts=True
                )
                (Path(tmp) / f"base-{i}.pdf").write_bytes(pdf)  # type: ignore[arg-type]

        _, b_wall, _ = _timed(baseline)
    pdfs_per_s = n / wall
    baseline_per_s = n_baseline / b_wall
    return {
        "letters": n,
        "pages": pages,
        "batch_pdf_bytes": batch_bytes,
        "batch_seconds": round(wall, 3),
        "batch_cpu_seconds": round(cpu, 3),
        "pdfs_per_s": round(pdfs_per_s, 1),
        "pdfs_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
        "single_letters": n_single,
        "single_pdfs_per_s": round(n_single / s_wall, 1),
        "baseline_letters": n_baseline,
        "baseline_pdfs_per_s": round(baseline_per_s, 1),
        "speedup_vs_baseline": round(pdfs_per_s / baseline_per_s, 1),
        "target_pdfs_per_cpu_s": 100,
    }


def bench_sms(n: int) -> dict[str, Any]:
    try:
        from recapito.fallback.sms import TwilioSettings, TwilioSms
        from recapito.sandbox.twilio import TwilioSandbox, TwilioSandboxServer
    except ImportError as exc:
        return {"sms_per_s": None, "sms_note": f"no sandbox Twilio API here ({exc})"}
    try:
        sandbox = TwilioSandbox()
        server = TwilioSandboxServer(sandbox).start()
    except Exception as exc:  # the sandbox is another helper's: report, never crash
        return {"sms_per_s": None, "sms_note": f"sandbox Twilio API did not start ({exc})"}
    try:
        sms = TwilioSms(
            TwilioSettings(
                sandbox.account_sid, sandbox.auth_token, "+15005550006", base_url=server.url
            )
        )
        sms.send("+393331234567", "warm-up")
        wall = time.perf_counter()
        for i in range(n):
            sms.send(f"+39333{1000000 + i}", f"Messaggio di prova {i}")
        seconds = time.perf_counter() - wall
    except Exception as exc:
        return {"sms_per_s": None, "sms_note": f"sandbox SMS failed ({type(exc).__name__}: {exc})"}
    finally:
        server.stop()
    return {
        "sms_per_s": round(n / seconds, 1),
        "sms_requests": n,
        "sms_seconds": round(seconds, 3),
        "sms_note": "sequential POSTs through the twilio SDK to the sandbox on 127.0.0.1",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--letters", type=int, default=2000, help="letters in the batch run")
    parser.add_argument("--single", type=int, default=200, help="letters, one PDF each")
    parser.add_argument("--baseline", type=int, default=100, help="letters, fresh compile each")
    parser.add_argument("--sms", type=int, default=200, help="SMS requests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {
        "cores": os.cpu_count(),
        **bench_letters(args.letters, args.single, args.baseline),
        **bench_sms(args.sms),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"letters, batch:    {result['pdfs_per_s']:>8} PDFs/s "
        f"({result['pdfs_per_cpu_s']} per CPU second; target ≥ 100 per core), "
        f"{result['letters']} letters, {result['pages']} pages in {result['batch_seconds']} s"
    )
    print(f"letters, single:   {result['single_pdfs_per_s']:>8} PDFs/s (one compiler reused)")
    print(
        f"letters, baseline: {result['baseline_pdfs_per_s']:>8} PDFs/s "
        f"(fresh compile per letter; batch is {result['speedup_vs_baseline']}×)"
    )
    sms = result["sms_per_s"] if result["sms_per_s"] is not None else "n/a"
    print(f"sms:               {sms:>8} requests/s ({result['sms_note']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
