"""Paper letters (Typst PDFs, Italian addresses, manifest) and the data-cleaning export."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import stat
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from recapito.config import Settings
from recapito.fallback.exports import COLUMNS, pseudonym, write_cleaning_export
from recapito.fallback.paper import (
    Letter,
    PaperOptions,
    WindowLayout,
    render_letters,
    validate_address,
)
from recapito.identity.verp import VerpKeyring
from recapito.ledger import Ledger, Outcome, PlannedDelivery, State
from recapito.ledger.schema import deliveries

pypdf = pytest.importorskip("pypdf")

OPTIONS = PaperOptions(on=date(2026, 12, 4))
INJECTION = 'Zoë #panic("boom") *Bold* $x^2$ <l> @ref \\ ]'


def _letter(letter_id: str, **changes: object) -> Letter:
    fields: dict[str, object] = {
        "letter_id": letter_id,
        "recipient": "Mario Rossi",
        "lines": ["Via Giuseppe Garibaldi 3"],
        "postcode": "20121",
        "city": "Milano",
        "province": "MI",
    }
    fields.update(changes)
    return Letter(**fields)  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _pages(path: Path) -> int:
    return len(pypdf.PdfReader(path).pages)


def _text(path: Path) -> str:
    return "\n".join(p.extract_text() or "" for p in pypdf.PdfReader(path).pages)


# ------------------------------------------------------------------ address validation


def test_address_validation_rules() -> None:
    assert validate_address(_letter("ok")) == []
    long_name = "Amministrazione Condominiale Giuseppe Verdi Sr"  # 46 characters
    assert validate_address(_letter("a", recipient=long_name)) == [
        "address: line 1 has 46 characters (at most 44)"
    ]
    assert validate_address(_letter("b", postcode="2012")) == [
        "address: CAP '2012' is not five digits"
    ]
    assert validate_address(_letter("c", postcode="2O121"))[0].startswith("address: CAP")
    assert validate_address(_letter("d", province="XX")) == [
        "address: province 'XX' is not an Italian province code"
    ]
    assert validate_address(_letter("e", province="Milano"))[0].startswith("address: province")
    assert validate_address(_letter("f", lines=[])) == [
        "address: no street line (via, piazza… and number, or casella postale)"
    ]
    six = _letter("g", lines=["Ufficio Estero", "Scala B", "Piano 3", "Via Roma 1"])
    assert validate_address(six) == ["address: 6 lines (at most 5 in Italy)"]
    assert validate_address(_letter("h", product="telegramma"))[0].startswith("product")
    assert validate_address(_letter("i", recipient="Mario\nRossi")) == [
        "address: control characters"
    ]
    # accents count as one character each, also when decomposed (NFC): 44 fits, 45 not
    accented = "Niccolò Sforza di Santa Maria in Forlì e Città"  # 46 with the accents
    assert len(accented) == 46
    assert validate_address(_letter("j", recipient=accented[:44])) == []
    decomposed = "Forli\u0300 " + "x" * 38  # 44 characters once composed
    assert validate_address(_letter("k", recipient=decomposed)) == []
    assert validate_address(_letter("l", city="Forlì", province="fc")) == []


# ------------------------------------------------------------------ rendering


def test_letters_one_pdf_each_with_manifest(tmp_path: Path) -> None:
    out = tmp_path / "letters"
    letters = [
        _letter("camp-1", recipient=INJECTION, product="raccomandata", delivery_id=1),
        _letter("camp-2", city="Forlì", province="fc", postcode="47121"),
        _letter("camp-3", postcode="123"),  # rejected, the others still render
        _letter("camp/4", body="Riga uno.\n\n" + "Testo lungo. " * 900),  # several pages
    ]
    manifest = render_letters(letters, out, batch=False, options=OPTIONS)

    assert [e.letter_id for e in manifest.letters] == ["camp-1", "camp-2", "camp/4"]
    assert [(r.letter_id, r.errors) for r in manifest.rejected] == [
        ("camp-3", ("address: CAP '123' is not five digits",))
    ]
    assert _mode(out) == 0o700
    for path in [*manifest.files, manifest.csv_path, manifest.json_path, manifest.rejected_path]:
        assert _mode(path) == 0o600, path
    for entry in manifest.letters:
        pdf = out / entry.file
        data = pdf.read_bytes()
        assert data.startswith(b"%PDF-")
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert _pages(pdf) == entry.pages == entry.last_page - entry.first_page + 1
    first, second, third = manifest.letters
    assert first.pages == 1 and third.pages > 1
    assert "/" not in third.file and third.file.endswith(".pdf")
    assert first.product == "raccomandata" and first.delivery_id == 1
    assert second.address_lines == ("MARIO ROSSI", "VIA GIUSEPPE GARIBALDI 3", "47121 FORLÌ FC")

    # the injection attempt is printed literally: markup characters and all
    text = _text(out / first.file)
    assert 'ZOË #PANIC("BOOM") *BOLD* $X^2$ <L> @REF \\ ]' in text  # the address block
    assert 'Zoë #panic("boom") *Bold* $x^2$ <l> @ref \\ ]' in text  # subject and greeting
    assert "RACCOMANDATA" in text and "4 dicembre 2026" in text

    rows = list(csv.DictReader(io.StringIO(manifest.csv_path.read_text(encoding="utf-8"))))
    assert [r["letter_id"] for r in rows] == ["camp-1", "camp-2", "camp/4"]
    assert rows[1]["file"] == second.file and rows[1]["sha256"] == second.sha256
    assert rows[1]["pages"] == "1" and rows[1]["product"] == "posta4"
    assert [rows[1][f"address_line_{i}"] for i in range(1, 5)] == [
        "MARIO ROSSI",
        "VIA GIUSEPPE GARIBALDI 3",
        "47121 FORLÌ FC",
        "",
    ]
    doc = json.loads(manifest.json_path.read_text(encoding="utf-8"))
    assert doc["mode"] == "single" and doc["window"]["top_mm"] == 45.0
    assert doc["letters"][0]["address_lines"][0] == 'ZOË #PANIC("BOOM") *BOLD* $X^2$ <L> @REF \\ ]'
    assert doc["rejected"] == [
        {
            "letter_id": "camp-3",
            "errors": ["address: CAP '123' is not five digits"],
            "contact_id": None,
            "campaign": None,
            "delivery_id": None,
        }
    ]


def test_letters_batch_pdf_indexed_by_the_manifest(tmp_path: Path) -> None:
    letters = [_letter(f"b-{i}", recipient=f"Cliente {i}") for i in range(30)]
    letters[7] = _letter("b-7", body="Lungo. " * 1500)
    letters.append(_letter("b-bad", province="ZZ"))
    options = PaperOptions(on=date(2026, 12, 4), window=WindowLayout.din5008_a())
    manifest = render_letters(letters, tmp_path / "batch", batch=True, options=options)

    assert len(manifest.letters) == 30 and [r.letter_id for r in manifest.rejected] == ["b-bad"]
    assert len(manifest.files) == 1 and manifest.files[0].name == "letters.pdf"
    pdf = manifest.files[0]
    assert _mode(pdf) == 0o600
    digest = hashlib.sha256(pdf.read_bytes()).hexdigest()
    assert {e.sha256 for e in manifest.letters} == {digest}
    # the index: consecutive page ranges covering the whole PDF
    expected_first = 1
    for entry in manifest.letters:
        assert entry.first_page == expected_first
        expected_first = entry.last_page + 1
    assert manifest.letters[-1].last_page == _pages(pdf) == manifest.pages
    assert manifest.letters[7].pages > 1
    reader = pypdf.PdfReader(pdf)
    page = manifest.letters[12].first_page - 1
    assert "CLIENTE 12" in (reader.pages[page].extract_text() or "")
    assert json.loads(manifest.json_path.read_text())["window"]["top_mm"] == 27.0


def test_address_sits_in_the_din_window(tmp_path: Path) -> None:
    manifest = render_letters([_letter("w")], tmp_path, batch=False, options=OPTIONS)
    page = pypdf.PdfReader(tmp_path / manifest.letters[0].file).pages[0]
    height = float(page.mediabox.height)
    where: dict[str, tuple[float, float]] = {}

    def visit(text: str, cm: list[float], tm: list[float], *_: object) -> None:
        if text.strip():
            x = cm[0] * tm[4] + cm[2] * tm[5] + cm[4]
            y = cm[1] * tm[4] + cm[3] * tm[5] + cm[5]
            where.setdefault(text.strip(), (x, y))

    page.extract_text(visitor_text=visit)
    mm = 72 / 25.4
    x, y = next(v for k, v in where.items() if "MARIO ROSSI" in k)
    top = (height - y) / mm  # baseline of the first address line, mm from the top edge
    assert 19.9 <= x / mm <= 22  # window's left edge at 20 mm
    assert 45 + 17.7 <= top <= 45 + 45  # in the address zone, below the remark zone


# ------------------------------------------------------------------ cleaning export


def _ledger_with_failures(tmp_path: Path) -> tuple[Ledger, int, int]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ids = []
    for name in ("spring", "autumn"):
        camp = ledger.ensure_campaign(name, sender="n@bank.test", template_hash="t", params={})
        ids.append(camp.id)
        ledger.plan(
            camp.id,
            [
                PlannedDelivery("c1", "anna@insecure.test", "insecure.test", 0),
                PlannedDelivery("c2", "bruno@gone.test", "gone.test", 0),
                PlannedDelivery("c3", "carla@ok.test", "ok.test", 0),
                PlannedDelivery("c4", "dario@full.test", "full.test", 0),
                PlannedDelivery("c5", "elena@later.test", "later.test", 0),
            ],
        )
        claims = {c.contact_id: c for c in ledger.claim_chunk(camp.id, 0, worker="t")}
        ledger.record(
            claims["c1"],
            Outcome(State.INSECURE_CHANNEL, mx_host="mx.insecure.test", reason="insecure_channel"),
        )
        ledger.record(
            claims["c2"],
            Outcome(
                State.FAILED,
                mx_host="mx.gone.test",
                reply_code=550,
                reason="user_unknown",
                permanence="permanent",
                tls_level="L2",
            ),
        )
        ledger.record(claims["c3"], Outcome(State.ACCEPTED, mx_host="mx.ok.test", tls_level="L3"))
        ledger.record(
            claims["c4"],
            Outcome(State.FAILED, reply_code=452, reason="mailbox_full", permanence="temporary"),
        )
        ledger.record(
            claims["c5"], Outcome(State.ACCEPTED, mx_host="mx.later.test", tls_level="L1")
        )
        # the bounce collector's move of an accepted message to bounced
        with ledger.engine.begin() as conn:
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == claims["c5"].delivery_id)
                .values(
                    state=State.BOUNCED.value, reason="mailbox_disabled", permanence="permanent"
                )
            )
    from recapito.ledger.store import MXFacts, utcnow

    now = utcnow()
    ledger.save_mx_facts(
        MXFacts("mx.insecure.test", False, False, None, None, "L0", None, now, now)
    )
    return ledger, ids[0], ids[1]


CONTACTS = pl.DataFrame(
    {
        "contact_id": ["c1", "c2", "c3", "c4", "c5"],
        "first_name": ["Anna", "Bruno", "Carla", "Dario", "Elena"],
        "last_name": ["Bianchi", "Verdi", "Neri", "Gialli", "Rossi"],
        "phone": ["+39 333 1111111", "+39 333 2222222", None, None, "3334444444"],
        "email": [
            "anna@insecure.test",
            "bruno@gone.test",
            "carla@ok.test",
            "dario@full.test",
            "elena@later.test",
        ],
    }
)


def test_cleaning_export_rows_field_by_field(tmp_path: Path) -> None:
    settings = Settings.load({"RECAPITO_HOME": str(tmp_path / "home")})
    keyring = VerpKeyring.parse("k1:" + "s" * 32)
    ledger, spring, autumn = _ledger_with_failures(tmp_path)
    out = tmp_path / "exports"
    try:
        result = write_cleaning_export(
            ledger, spring, out, settings=settings, keyring=keyring, contacts=CONTACTS
        )
        today = ledger.campaign_by_id(spring).created_at.date().isoformat()
        assert result.rows == 3 and result.rolling_rows == 3
        frame = pl.read_parquet(out / "cleaning-spring.parquet")
        assert tuple(frame.columns) == COLUMNS
        assert frame.to_dicts() == [
            {
                "key": pseudonym("c1", keyring),
                "campaign": "spring",
                "name": "Anna Bianchi",
                "phone": "+39 333 1111111",
                "reason_code": "insecure_channel",
                "failing_domain": "insecure.test",
                "mx_level": "L0",  # from the MX host's facts
                "date": today,
            },
            {
                "key": pseudonym("c2", keyring),
                "campaign": "spring",
                "name": "Bruno Verdi",
                "phone": "+39 333 2222222",
                "reason_code": "user_unknown",
                "failing_domain": "gone.test",
                "mx_level": "L2",
                "date": today,
            },
            {
                "key": pseudonym("c5", keyring),
                "campaign": "spring",
                "name": "Elena Rossi",
                "phone": "3334444444",
                "reason_code": "mailbox_disabled",
                "failing_domain": "later.test",
                "mx_level": "L1",
                "date": today,
            },
        ]
        assert pseudonym("c1", keyring).startswith("k1-") and len(pseudonym("c1", keyring)) == 35
        from_csv = pl.read_csv(out / "cleaning-spring.csv", infer_schema=False)
        assert from_csv.to_dicts() == frame.to_dicts()

        # a second campaign: the rolling export keeps one row per contact
        write_cleaning_export(
            ledger, autumn, out, settings=settings, keyring=keyring, contacts=CONTACTS
        )
        rolling = pl.read_parquet(out / "cleaning-rolling.parquet")
        assert rolling.height == 3
        assert sorted(rolling["key"].to_list()) == sorted(frame["key"].to_list())
        assert set(rolling["campaign"].to_list()) == {"autumn"}
        # run again for the same campaign: nothing doubles
        again = write_cleaning_export(
            ledger, autumn, out, settings=settings, keyring=keyring, contacts=CONTACTS
        )
        assert again.rolling_rows == 3
        rebuilt = write_cleaning_export(
            ledger, None, out, settings=settings, keyring=keyring, contacts=CONTACTS
        )
        assert rebuilt.rows == 6 and rebuilt.rolling_rows == 3

        assert stat.S_IMODE(out.stat().st_mode) == 0o700
        for path in out.iterdir():
            assert _mode(path) == 0o600, path
            raw = path.read_bytes()
            assert b"@" not in raw, path  # no e-mail address, in CSV or Parquet
            for text in (b"carla", b"Dario"):  # reached, or only a temporary failure
                assert text not in raw, path
    finally:
        ledger.close()


def test_cleaning_export_key_from_settings(tmp_path: Path) -> None:
    """Without an explicit keyring the key comes from RECAPITO_EXPORT_KEYS (else generated)."""
    ledger, spring, _ = _ledger_with_failures(tmp_path)
    try:
        env = {"RECAPITO_HOME": str(tmp_path / "h"), "RECAPITO_EXPORT_KEYS": "ab:" + "x" * 32}
        settings = Settings.load(env)
        write_cleaning_export(ledger, spring, tmp_path / "o", settings=settings)
        keys = pl.read_parquet(tmp_path / "o" / "cleaning-spring.parquet")["key"].to_list()
        assert keys[0] == pseudonym("c1", VerpKeyring.parse("ab:" + "x" * 32))
        # no audience snapshot and no contacts given: name and phone are empty
        frame = pl.read_parquet(tmp_path / "o" / "cleaning-spring.parquet")
        assert frame["name"].to_list() == [None, None, None]
        generated = Settings.load({"RECAPITO_HOME": str(tmp_path / "g")})
        write_cleaning_export(ledger, spring, tmp_path / "o2", settings=generated)
        assert _mode(tmp_path / "g" / "secrets" / "export-keys") == 0o600
    finally:
        ledger.close()


def test_cli_letters_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from recapito.campaign import campaign_dir
    from recapito.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("RECAPITO_HOME", str(home))
    monkeypatch.setenv("RECAPITO_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    for name in ("RECAPITO_EXPORT_KEYS", "RECAPITO_EXPORT_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    ledger, _, _ = _ledger_with_failures(tmp_path)
    ledger.close()
    settings = Settings.load()
    folder = campaign_dir(settings, "spring")
    folder.mkdir(parents=True)
    CONTACTS.with_columns(
        postal_address=pl.Series(["Via Roma 1", "Corso Italia 22", None, None, None]),
        postcode=pl.Series(["00184", "20122", None, None, "1234"]),
        city=pl.Series(["Roma", "Milano", None, None, "Bari"]),
        province=pl.Series(["RM", "MI", None, None, "BA"]),
    ).write_parquet(folder / "audience.parquet")

    runner = CliRunner()
    done = runner.invoke(main, ["fallback", "letters", "--campaign", "spring", "--batch", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    assert result["selected_by"] == "failures"
    assert (result["letters"], result["rejected"], result["files"]) == (2, 1, ["letters.pdf"])
    doc = json.loads((folder / "letters" / "manifest.json").read_text())
    assert [e["address_lines"] for e in doc["letters"]] == [
        ["ANNA BIANCHI", "VIA ROMA 1", "00184 ROMA RM"],
        ["BRUNO VERDI", "CORSO ITALIA 22", "20122 MILANO MI"],
    ]
    assert doc["rejected"][0]["contact_id"] == "c5"

    done = runner.invoke(main, ["fallback", "export", "--campaign", "spring"])
    assert done.exit_code == 0, done.output
    export = pl.read_csv(home / "exports" / "cleaning" / "cleaning-spring.csv")
    assert export["name"].to_list() == ["Anna Bianchi", "Bruno Verdi", "Elena Rossi"]
    missing = runner.invoke(main, ["fallback", "export", "--campaign", "nope"])
    assert missing.exit_code != 0 and "no campaign named 'nope'" in missing.output


def test_a_letter_typst_refuses_is_rejected_not_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typst

    from recapito.fallback import paper

    real = paper._Typst.compile

    def refusing(self: paper._Typst, letters: list[dict[str, object]]) -> object:
        if any(item["id"] == "x-2" for item in letters):
            raise typst.TypstError("layout did not converge")
        return real(self, letters)

    monkeypatch.setattr(paper._Typst, "compile", refusing)
    letters = [_letter(f"x-{i}") for i in range(4)]
    manifest = render_letters(letters, tmp_path, batch=True, options=OPTIONS)
    assert [e.letter_id for e in manifest.letters] == ["x-0", "x-1", "x-3"]
    assert [(r.letter_id, r.errors) for r in manifest.rejected] == [
        ("x-2", ("typst: layout did not converge",))
    ]
    assert _pages(manifest.files[0]) == 3


def test_letters_follow_the_paper_steps_of_the_sweeper(tmp_path: Path) -> None:
    from recapito.fallback.letters import campaign_letters
    from recapito.fallback.policy import parse_policy
    from recapito.fallback.sweeper import PaperQueue, Sweeper, enroll
    from recapito.ledger.store import utcnow

    ledger, spring, _ = _ledger_with_failures(tmp_path)
    try:
        settings = Settings.load({"RECAPITO_HOME": str(tmp_path / "home")})
        audience = CONTACTS.with_columns(
            postal_address=pl.lit("Via Roma 1"),
            postcode=pl.lit("00184"),
            city=pl.lit("Roma"),
            province=pl.lit("RM"),
        )
        letters, source = campaign_letters(ledger, settings, "spring", audience=audience)
        assert source == "failures"
        assert [x.contact_id for x in letters] == ["c1", "c2", "c5"]

        policy = parse_policy("email → on insecure_channel → paper")
        sweeper = Sweeper(ledger, policy, {"paper": PaperQueue()}, campaign_id=spring)
        enroll(ledger, spring, policy, {})
        now = utcnow()
        sweeper.sweep(now)
        sweeper.sweep(now)
        letters, source = campaign_letters(
            ledger, settings, "spring", audience=audience, product="raccomandata"
        )
        assert source == "policy"
        assert [(x.contact_id, x.product) for x in letters] == [("c1", "raccomandata")]
        assert letters[0].recipient == "Anna Bianchi" and letters[0].letter_id.startswith("spring-")
    finally:
        ledger.close()
