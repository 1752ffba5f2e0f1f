"""Tracking (open pixel, click redirect, classification) and one-click unsubscribe.

The service runs on real uvicorn on 127.0.0.1; the browser test drives Debian's
/usr/bin/chromium through Playwright (never a downloaded browser).
"""

from __future__ import annotations

import email
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path

import httpx
import polars as pl
import pytest
import sqlalchemy as sa

from recapito.campaign import CampaignParams, chunk_renderer
from recapito.config import Settings
from recapito.contacts.targeting import target
from recapito.identity.verp import keyring_from_entries
from recapito.ledger import Claim, Ledger, Outcome, PlannedDelivery, State
from recapito.ledger.schema import suppressions, tracking_hits
from recapito.render.template import load_template
from recapito.report import campaign_report, funnel_markdown
from recapito.tracking import Tracker, tracker_for
from recapito.tracking.classify import classify_click, classify_open, ip_prefix
from recapito.tracking.service import TrackingApp, running
from recapito.tracking.store import TrackingStore, unsubscribe_by_mail
from recapito.tracking.tokens import (
    TokenError,
    TokenSigner,
    _b64,
    tracking_keyring,
    unsubscribe_token_from_address,
)

CHROMIUM = Path("/usr/bin/chromium")
HUMAN_UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Thunderbird/128.3"
SIGNER = TokenSigner(keyring_from_entries([("k1", "first-secret-0123456789")]))

BODY = """<!doctype html><html><body>
<p><a href="https://www.bank.test/area?x=1&amp;y=2">Area</a>
<a href='http://www.bank.test/plain'>plain</a>
<a href="mailto:help@bank.test">write</a> <a href="#top">top</a> <a href="tel:+39061234">call</a>
<a data-notrack href="https://www.bank.test/private">private</a>
<a href="{{ unsubscribe_url }}">unsubscribe</a></p>
<p>Hello {{ nome | default('cliente') }}</p>
</body></html>
"""


# ---- tokens -------------------------------------------------------------------------------


def test_tokens_roundtrip() -> None:
    assert SIGNER.verify_open(SIGNER.open_token(42)) == 42
    click = SIGNER.verify_click(SIGNER.click_token(42, 3, "https://x.test/a?b=1&c=ü"))
    assert (click.delivery_id, click.index, click.url) == (42, 3, "https://x.test/a?b=1&c=ü")
    unsub = SIGNER.unsubscribe_token(42)
    assert SIGNER.verify_unsubscribe(unsub) == 42
    assert SIGNER.verify_unsubscribe(unsub.upper()) == 42  # case-insensitive (mailto form)
    assert unsubscribe_token_from_address(f"<Unsubscribe+{unsub.upper()}@bank.test>") == unsub
    assert "first-secret" not in repr(SIGNER)


def test_tokens_rotate_newest_signs_all_verify() -> None:
    old = SIGNER.click_token(7, 0, "https://x.test/")
    rotated = TokenSigner(
        keyring_from_entries(
            [("k2", "second-secret-0123456789"), ("k1", "first-secret-0123456789")]
        )
    )
    assert rotated.verify_click(old).url == "https://x.test/"
    assert rotated.verify_open(SIGNER.open_token(7)) == 7
    assert rotated.open_token(7).startswith("k2.")
    retired = TokenSigner(keyring_from_entries([("k2", "second-secret-0123456789")]))
    with pytest.raises(TokenError):
        retired.verify_click(old)


def test_tampered_tokens_do_not_verify() -> None:
    token = SIGNER.click_token(7, 0, "https://www.bank.test/")
    kid, did, idx, target_b64, mac = token.split(".")
    evil = _b64(b"https://evil.test/")
    for forged in (
        f"{kid}.{did}.{idx}.{evil}.{mac}",  # another target: no open redirect
        f"{kid}.8.{idx}.{target_b64}.{mac}",  # another delivery
        f"{kid}.{did}.1.{target_b64}.{mac}",  # another link index
        f"{kid}.{did}.{idx}.{target_b64}.{mac[:-1]}A" if mac[-1] != "A" else token[:-1] + "B",
        f"zz.{did}.{idx}.{target_b64}.{mac}",  # unknown key
        "garbage",
    ):
        with pytest.raises(TokenError):
            SIGNER.verify_click(forged)
    # a token of one kind is no token of another kind
    with pytest.raises(TokenError):
        SIGNER.verify_unsubscribe(SIGNER.open_token(7).replace(".", "-"))
    with pytest.raises(TokenError):
        SIGNER.verify_open(SIGNER.unsubscribe_token(7))
    # a valid MAC over a non-http target is refused too
    with pytest.raises(TokenError):
        SIGNER.verify_click(SIGNER.click_token(7, 0, "javascript:alert(1)"))


def test_keys_from_settings_or_generated_0600(tmp_path: Path) -> None:
    settings = Settings.load(env={"RECAPITO_HOME": str(tmp_path)})
    ring = tracking_keyring(settings)
    path = tmp_path / "secrets" / "tracking-keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tracking_keyring(settings).keys == ring.keys  # kept, not made anew
    secret = ring.keys[0][1].decode()
    assert secret not in repr(ring) and secret not in repr(settings)
    explicit = Settings.load(
        env={
            "RECAPITO_HOME": str(tmp_path),
            "RECAPITO_TRACKING_KEYS": "b:bbbbbbbbbbbbbbbbbbbb,a:aaaaaaaaaaaaaaaaaaaa",
        }
    )
    assert tracking_keyring(explicit).key_ids == ("b", "a")
    assert "bbbb" not in repr(explicit)


# ---- rewriting ----------------------------------------------------------------------------


def test_links_rewritten_and_pixel_added() -> None:
    tracker = Tracker(SIGNER, "https://t.bank.test", "bank.test")
    unsub = tracker.body_link(5)
    html = BODY.replace("{{ unsubscribe_url }}", unsub).replace(
        "{{ nome | default('cliente') }}", "Anna"
    )
    text = "Area: https://www.bank.test/area?x=1&y=2.\nOther: https://www.bank.test/other\n" + unsub
    new_html, new_text = tracker.rewrite(html, text, 5)
    clicks = [p.split('"')[0] for p in new_html.split('href="https://t.bank.test/c/')[1:]]
    targets = [SIGNER.verify_click(c) for c in clicks]
    assert [t.url for t in targets] == [
        "https://www.bank.test/area?x=1&y=2",
        "http://www.bank.test/plain",
    ]
    assert [t.index for t in targets] == [0, 1]
    for kept in (
        '"mailto:help@bank.test"',
        '"#top"',
        '"tel:+39061234"',
        'data-notrack href="https://www.bank.test/private"',
        f'href="{unsub}"',
    ):
        assert kept in new_html
    pixel = new_html.index('src="https://t.bank.test/o/')
    assert pixel < new_html.index("</body>")
    # the text part: the same link gets the same click URL; trailing punctuation stays
    assert f"https://t.bank.test/c/{clicks[0]}.\n" in new_text
    assert (
        SIGNER.verify_click(new_text.split("Other: https://t.bank.test/c/")[1].split("\n")[0]).index
        == 2
    )
    assert new_text.endswith(unsub)
    assert tracker.rewrite(html, text, 5) == (new_html, new_text)  # deterministic


def test_unsubscribe_headers() -> None:
    headers = Tracker(SIGNER, "https://t.bank.test", "bounce.bank.test").headers(9)
    token = SIGNER.unsubscribe_token(9)
    assert headers == {
        "List-Unsubscribe": f"<https://t.bank.test/u/{token}>, "
        f"<mailto:unsubscribe+{token}@bounce.bank.test?subject=unsubscribe>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    # no tracking service configured: the mailto: form only, and no one-click promise
    assert list(Tracker(SIGNER, None, "bank.test").headers(9)) == ["List-Unsubscribe"]


def test_classification() -> None:
    assert classify_open("Mozilla/5.0", "17.58.3.7", 3600).reason == "apple_mpp"
    assert classify_open(HUMAN_UA, "17.1.2.3", 3600).klass == "machine"
    assert (
        classify_open("Mozilla/5.0 (via ggpht.com GoogleImageProxy)", None, 99).reason
        == "google_image_proxy"
    )
    assert classify_open("YahooMailProxy; https://help.yahoo.com", None, 99).klass == "machine"
    assert classify_open(HUMAN_UA, "198.51.100.4", 1.0).reason == "too_fast"
    assert classify_open(HUMAN_UA, "198.51.100.4", 600).klass == "human"
    assert classify_click("HEAD", HUMAN_UA, 600).reason == "head_request"
    assert classify_click("GET", "Barracuda Sentinel (EE)", 600).reason == "barracuda"
    assert classify_click("GET", "python-requests/2.31", 600).klass == "scanner"
    assert classify_click("GET", HUMAN_UA, 2.0).reason == "too_fast"
    assert classify_click("GET", HUMAN_UA, 60.0).klass == "human"
    assert ip_prefix("198.51.100.77") == "198.51.100.0/24"
    assert ip_prefix("2001:db8:1234:5678::1") == "2001:db8:1234::/48"
    assert ip_prefix("::ffff:192.0.2.9") == "192.0.2.0/24"
    assert ip_prefix("not-an-ip") is None


# ---- campaign rendering: tracking on and off ---------------------------------------------


def _template(tmp_path: Path) -> Path:
    folder = tmp_path / "tpl"
    folder.mkdir()
    (folder / "template.toml").write_text("subject = \"Ciao {{ nome | default('cliente') }}\"\n")
    (folder / "body.html").write_text(BODY)
    return folder


def _render(tmp_path: Path, tracking: bool, contact_tracking: object) -> Message:
    params = CampaignParams(
        name="trk",
        contacts="unused.csv",
        template=str(_template(tmp_path)),
        sender="news@bank.test",
        tracking=tracking,
    )
    audience = pl.DataFrame(
        {
            "contact_id": ["c1"],
            "email": ["anna@example.test"],
            "tracking": [contact_tracking],
            "_chunk": [0],
        }
    )
    tracker = Tracker(SIGNER, "https://t.bank.test", "bank.test")
    render = chunk_renderer(load_template(params.template), audience, params, None, tracker)
    claim = Claim(11, 1, "c1", "anna@example.test", "example.test", 0, 1, "tok")
    message = render(claim)
    return email.message_from_bytes(message.data, policy=default_policy)


def _bodies(message: Message) -> str:
    return "".join(
        str(p.get_content()) for p in message.walk() if p.get_content_maintype() == "text"
    )


@pytest.mark.parametrize(
    ("campaign_on", "contact", "tracked"),
    [
        (True, "yes", True),
        (True, None, True),
        (True, "no", False),
        (True, "false", False),
        (False, "yes", False),
    ],
)
def test_tracking_per_campaign_and_contact(
    tmp_path: Path, campaign_on: bool, contact: object, tracked: bool
) -> None:
    message = _render(tmp_path, campaign_on, contact)
    bodies = _bodies(message)
    assert ("https://t.bank.test/c/" in bodies) is tracked
    assert ("https://t.bank.test/o/" in bodies) is tracked
    assert ("https://www.bank.test/area?x=1&y=2" in bodies) is not tracked
    # unsubscribe is compliance, not tracking: always there, in the headers and the body
    token = SIGNER.unsubscribe_token(11)
    assert f"<https://t.bank.test/u/{token}>" in str(message["List-Unsubscribe"])
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert f'href="https://t.bank.test/u/{token}"' in bodies


# ---- the service over real uvicorn --------------------------------------------------------


@dataclass
class World:
    ledger: Ledger
    campaign_id: int
    deliveries: dict[str, int]  # contact id -> delivery id
    base: str
    tracker: Tracker


def _ledger_with_accepted(tmp_path: Path, n: int = 4) -> tuple[Ledger, int, dict[str, int]]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    camp = ledger.ensure_campaign("trk", sender="news@bank.test", template_hash="h" * 64, params={})
    ledger.plan(
        camp.id,
        [PlannedDelivery(f"c{i}", f"user{i}@example.test", "example.test", 0) for i in range(n)],
    )
    ids = {}
    for claim in ledger.claim_chunk(camp.id, 0, worker="test"):
        ledger.record(
            claim, Outcome(State.ACCEPTED, reply_code=250, message_id=f"<{claim.delivery_id}@x>")
        )
        ids[claim.contact_id] = claim.delivery_id
    return ledger, camp.id, ids


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    ledger, campaign_id, ids = _ledger_with_accepted(tmp_path)
    # scanner window 0: every hit counts by agent and method alone (timing tested apart)
    app = TrackingApp(TrackingStore(ledger), SIGNER, scanner_window=0.0)
    with running(app) as service:
        yield World(
            ledger, campaign_id, ids, service.url, Tracker(SIGNER, service.url, "bank.test")
        )
    ledger.close()


def _hits(ledger: Ledger) -> list[dict[str, object]]:
    with ledger.engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(sa.select(tracking_hits).order_by(tracking_hits.c.id))
        ]


def test_service_open_click_and_classification(world: World) -> None:
    d0, d1, d2 = world.deliveries["c0"], world.deliveries["c1"], world.deliveries["c2"]
    base = world.base
    with httpx.Client(follow_redirects=False, trust_env=False, timeout=10) as client:
        pixel = client.get(
            f"{base}/o/{SIGNER.open_token(d0)}",
            headers={"User-Agent": HUMAN_UA, "X-Forwarded-For": "198.51.100.77"},
        )
        assert pixel.status_code == 200
        assert pixel.headers["content-type"] == "image/gif" and pixel.content.startswith(b"GIF89a")
        assert "no-store" in pixel.headers["cache-control"]
        # Apple MPP prefetch from Apple's proxy, Gmail's image proxy
        mpp = client.get(
            f"{base}/o/{SIGNER.open_token(d1)}",
            headers={"User-Agent": "Mozilla/5.0", "X-Forwarded-For": "17.58.100.9"},
        )
        assert mpp.status_code == 200
        client.get(
            f"{base}/o/{SIGNER.open_token(d2)}",
            headers={"User-Agent": "Mozilla/5.0 (via ggpht.com GoogleImageProxy)"},
        )

        link = f"{base}/c/{SIGNER.click_token(d0, 0, 'https://www.bank.test/area?x=1&y=2')}"
        human = client.get(
            link, headers={"User-Agent": HUMAN_UA, "X-Forwarded-For": "198.51.100.77"}
        )
        assert human.status_code == 302
        assert human.headers["location"] == "https://www.bank.test/area?x=1&y=2"
        scanner = client.head(
            f"{base}/c/{SIGNER.click_token(d1, 0, 'https://www.bank.test/')}",
            headers={"User-Agent": HUMAN_UA},
        )
        assert scanner.status_code == 302
        client.get(
            f"{base}/c/{SIGNER.click_token(d2, 0, 'https://www.bank.test/')}",
            headers={"User-Agent": "Barracuda Sentinel (EE)"},
        )

        # forged, tampered, unknown and oversized requests: quick 404/414, no traceback
        kid, did, idx, _target, mac = SIGNER.click_token(d0, 0, "https://www.bank.test/").split(".")
        forged = f"{kid}.{did}.{idx}.{_b64(b'https://evil.test/')}.{mac}"
        assert client.get(f"{base}/c/{forged}").status_code == 404
        assert client.get(f"{base}/o/k1.{d0}.AAAAAAAAAAAAAAAAAAAAAA").status_code == 404
        assert client.get(f"{base}/u/{d0}-k1-aaaaaaaaaaaaaaaaaaaa").status_code == 404
        assert client.get(f"{base}/nothing").status_code == 404
        assert client.get(f"{base}/c/" + "A" * 5000).status_code == 414
        assert client.post(f"{base}/o/{SIGNER.open_token(d0)}").status_code == 405
        big = client.post(f"{base}/u/{SIGNER.unsubscribe_token(d0)}", content=b"x" * 100_000)
        assert big.status_code == 413

    hits = _hits(world.ledger)
    seen = [(h["delivery_id"], h["kind"], h["class"], h["reason"], h["method"]) for h in hits]
    assert seen == [
        (d0, "open", "human", "", "GET"),
        (d1, "open", "machine", "apple_mpp", "GET"),
        (d2, "open", "machine", "google_image_proxy", "GET"),
        (d0, "click", "human", "", "GET"),
        (d1, "click", "scanner", "head_request", "HEAD"),
        (d2, "click", "scanner", "barracuda", "GET"),
    ]
    assert hits[0]["ip_prefix"] == "198.51.100.0/24"
    assert hits[1]["ip_prefix"] == "17.58.100.0/24"
    assert all("198.51.100.77" not in str(h.values()) for h in hits)  # never the full address
    assert hits[0]["user_agent"] == HUMAN_UA
    assert hits[3]["target"] == "https://www.bank.test/area?x=1&y=2" and hits[3]["link_index"] == 0
    assert all(isinstance(h["delay_s"], float) and 0 <= float(h["delay_s"]) < 60 for h in hits)

    report = campaign_report(world.ledger, "trk")
    engagement = report["engagement"]
    assert engagement["opens"] == {"human": 1, "human_pixel": 1, "machine": 2}
    assert engagement["clicks"] == {"human": 1, "scanner": 2}
    markdown = funnel_markdown(report)
    assert "| opened | 1 |" in markdown and "2 machine opens" in markdown
    assert "| clicked | 1 |" in markdown and "2 scanner clicks" in markdown


def test_fast_hits_are_machines(tmp_path: Path) -> None:
    ledger, _cid, ids = _ledger_with_accepted(tmp_path, 1)
    app = TrackingApp(TrackingStore(ledger), SIGNER, scanner_window=60.0)
    with running(app) as service, httpx.Client(trust_env=False) as client:
        d0 = ids["c0"]
        client.get(f"{service.url}/o/{SIGNER.open_token(d0)}", headers={"User-Agent": HUMAN_UA})
        client.get(
            f"{service.url}/c/{SIGNER.click_token(d0, 0, 'https://a.test/')}",
            headers={"User-Agent": HUMAN_UA},
        )
    assert [(h["class"], h["reason"]) for h in _hits(ledger)] == [
        ("machine", "too_fast"),
        ("scanner", "too_fast"),
    ]
    ledger.close()


def test_unsubscribe_get_shows_page_post_suppresses(world: World) -> None:
    d3 = world.deliveries["c3"]
    url = world.tracker.unsubscribe_url(d3)
    assert url is not None
    with httpx.Client(trust_env=False, timeout=10) as client:
        page = client.get(url)
        assert page.status_code == 200
        assert '<form method="post"' in page.text and "<button" in page.text
        assert "u•••" in page.text and "user3@example.test" not in page.text  # masked
        assert world.ledger.suppressed_among(["user3@example.test"]) == set()  # GET did nothing
        assert client.post(url, content=b"").status_code == 400  # not a one-click request
        assert world.ledger.suppressed_among(["user3@example.test"]) == set()
        # RFC 8058: what a mail client sends
        done = client.post(url, data={"List-Unsubscribe": "One-Click"})
        assert done.status_code == 200
        assert (
            client.post(url, data={"List-Unsubscribe": "One-Click"}).status_code == 200
        )  # again: fine
    assert world.ledger.suppressed_among(["USER3@example.test"]) == {"user3@example.test"}
    with world.ledger.engine.connect() as conn:
        row = conn.execute(sa.select(suppressions)).one()._mapping
    assert (row["reason"], row["source"], row["campaign_id"]) == (
        "unsubscribed",
        "list-unsubscribe",
        world.campaign_id,
    )
    events = world.ledger.events_of(world.campaign_id, "unsubscribe")
    assert [e["delivery_id"] for e in events] == [d3]  # one event, not one per POST
    assert campaign_report(world.ledger, "trk")["engagement"]["unsubscribed"] == 1


def test_unsubscribe_by_mail(world: World) -> None:
    store = TrackingStore(world.ledger)
    d1 = world.deliveries["c1"]
    token = SIGNER.unsubscribe_token(d1)
    assert unsubscribe_by_mail(store, SIGNER, "unsubscribe+zz-k1-abc@bank.test") is None
    assert unsubscribe_by_mail(store, SIGNER, f"bounces+{token}@bank.test") is None
    # an MTA may have upper-cased the local part
    assert unsubscribe_by_mail(store, SIGNER, f"<UNSUBSCRIBE+{token.upper()}@bank.test>") is True
    assert unsubscribe_by_mail(store, SIGNER, f"unsubscribe+{token}@bank.test") is False
    assert world.ledger.suppressed_among(["user1@example.test"]) == {"user1@example.test"}


def _chromium_reason() -> str | None:
    if not CHROMIUM.exists():
        return "/usr/bin/chromium missing: Debian's chromium is not installed (.ci/run installs it)"
    return None


def test_browser_unsubscribe_then_targeting_skips_the_contact(world: World) -> None:
    reason = _chromium_reason()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    d2 = world.deliveries["c2"]
    url = world.tracker.unsubscribe_url(d2)
    assert url is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(url)
            assert page.title() == "Unsubscribe"
            # loading the page unsubscribes nobody
            assert world.ledger.suppressed_among(["user2@example.test"]) == set()
            page.click("#unsubscribe")
            page.wait_for_selector("#done", timeout=10_000)
            assert "will receive no more" in page.inner_text("#done")
        finally:
            browser.close()
    assert world.ledger.suppressed_among(["user2@example.test"]) == {"user2@example.test"}

    contacts = pl.DataFrame(
        {"email": [f"user{i}@example.test" for i in range(4)], "nome": ["A", "B", "C", "D"]}
    )
    targeted = target(contacts, None, None, world.ledger.suppressed_among)
    assert "user2@example.test" not in targeted.audience["email"].to_list()
    assert targeted.audience.height == 3


# ---- the CLI ------------------------------------------------------------------------------


def test_cli_tracking_serve(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECAPITO_")}
    env["RECAPITO_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "recapito.cli", "tracking", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False).text == "ok\n":
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.stderr else ""
            )
            time.sleep(0.2)
        settings = Settings.load(env=env)
        signer = TokenSigner(tracking_keyring(settings))  # the key the service generated
        assert (
            httpx.get(
                f"http://127.0.0.1:{port}/c/{signer.click_token(1, 0, 'https://a.test/')}",
                trust_env=False,
            ).status_code
            == 302
        )
        assert (
            httpx.get(
                f"http://127.0.0.1:{port}/c/{SIGNER.click_token(1, 0, 'https://a.test/')}",
                trust_env=False,
            ).status_code
            == 404
        )
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
    assert "Traceback" not in err
    assert "tracking service on http://127.0.0.1:" in err
    secret = signer.keyring.keys[0][1].decode()
    assert secret not in err


def test_tracker_for_settings(tmp_path: Path) -> None:
    settings = Settings.load(
        env={
            "RECAPITO_HOME": str(tmp_path),
            "RECAPITO_TRACKING_URL": "https://t.bank.test/",
            "RECAPITO_BOUNCE_DOMAIN": "b.bank.test",
        }
    )
    tracker = tracker_for(settings, "news@bank.test")
    assert tracker.base_url == "https://t.bank.test"
    assert "@b.bank.test?" in tracker.headers(1)["List-Unsubscribe"]
    from recapito.errors import ConfigError

    with pytest.raises(ConfigError):
        Settings.load(env={"RECAPITO_HOME": str(tmp_path), "RECAPITO_TRACKING_URL": "t.bank.test"})
