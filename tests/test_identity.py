"""Sender identity: signed VERP return paths and DKIM signatures.

DKIM signatures are checked by dkimpy's verifier with the public keys looked up in the
sandbox's own DNS server (a real UDP/TCP server on 127.0.0.1), and a small campaign is run
through the sandbox MX servers: every stored message must verify and its Return-Path must
map back to its delivery.
"""

from __future__ import annotations

import random
import stat
from pathlib import Path

import dkim
import dns.resolver
import pytest

from recapito.campaign import CampaignParams, deliver_chunk, prepare
from recapito.config import Settings
from recapito.errors import ConfigError
from recapito.identity import DkimSigner, SenderIdentity, VerpError, VerpKeyring
from recapito.identity.dkim import DkimKey, generate_private_key_pem, relaxed_body
from recapito.identity.verp import delivery_from_return_path, parse_verp, verp_address
from recapito.ledger import Ledger
from recapito.render.template import message_id_for
from recapito.sandbox import world
from recapito.sandbox.dkimkeys import dkim_setting
from recapito.sandbox.maildir import iter_maildirs
from recapito.sandbox.runtime import Sandbox

K1 = "k1:first-secret-0123456789"
K2 = "k2:second-secret-9876543210"
BOTH = ("rsa-sha256", "ed25519-sha256")


# -- VERP -----------------------------------------------------------------------------------


def test_verp_roundtrip_and_case_folding() -> None:
    ring = VerpKeyring.parse(K1)
    address = verp_address(123456, ring, "Bank.Example")
    local, _, domain = address.partition("@")
    assert domain == "bank.example"
    assert local.startswith("bounces+123456-k1-")
    assert len(local) <= 64  # RFC 5321 local-part limit
    assert parse_verp(address, ring) == 123456
    # MTAs may fold the local part either way; brackets as in a Return-Path header
    assert parse_verp(address.upper(), ring) == 123456
    assert parse_verp(f"<{address}>", ring) == 123456
    assert parse_verp(verp_address(0, ring, "b.example"), ring) == 0


def test_verp_rotation_old_keys_still_verify() -> None:
    old_ring = VerpKeyring.parse(K1)
    old_address = verp_address(42, old_ring, "bank.example")
    rotated = VerpKeyring.parse(f"{K2},{K1}")  # the new key first: it signs
    new_address = verp_address(42, rotated, "bank.example")
    assert "-k2-" in new_address and new_address != old_address
    assert parse_verp(old_address, rotated) == 42
    assert parse_verp(new_address, rotated) == 42
    retired = VerpKeyring.parse(K2)  # k1 dropped: its tokens no longer verify
    with pytest.raises(VerpError, match="unknown key 'k1'"):
        parse_verp(old_address, retired)


def test_verp_tampered_and_forged_tokens_are_rejected() -> None:
    ring = VerpKeyring.parse(K1)
    address = verp_address(1000, ring, "bank.example")
    mac = address.split("@")[0].rsplit("-", 1)[1]
    flipped = ("b" if mac[0] != "b" else "c") + mac[1:]
    forged = [
        address.replace("+1000-", "+1001-"),  # another delivery, same MAC
        address.replace(mac, flipped),  # one character of the MAC changed
        address.replace(mac, "a" * 16),  # a made-up MAC
        # the same delivery signed with a key the attacker made up, under a known key id
        verp_address(1000, VerpKeyring.parse("k1:attacker-secret-000000"), "bank.example"),
    ]
    for bad in forged:
        with pytest.raises(VerpError, match="does not verify"):
            parse_verp(bad, ring)
        assert delivery_from_return_path(bad, ring) is None
    malformed = [
        "bounces@bank.example",  # no token
        "news+1000-k1@bank.example",  # another local part
        address.replace("bounces+", "other+"),
        address.replace(mac, mac[:-1]),  # truncated MAC
        "bounces+abc-k1-aaaaaaaaaaaaaaaa@bank.example",  # not a number
        "",
    ]
    for bad in malformed:
        with pytest.raises(VerpError):
            parse_verp(bad, ring)
    assert parse_verp(address.replace("bounces+", "other+"), ring, prefix=None) == 1000


def test_verp_keys_are_validated_and_never_shown() -> None:
    ring = VerpKeyring.parse(f"{K2}\n# a comment\n{K1}\n")
    assert ring.key_ids == ("k2", "k1") and ring.signing_key_id == "k2"
    assert "secret" not in repr(ring)
    settings = Settings.load({"RECAPITO_HOME": "/tmp", "RECAPITO_VERP_KEYS": K1})
    assert "first-secret" not in repr(settings)
    for bad, message in [
        ("k1", "id:secret"),
        ("k1:short", "at least 16"),
        (f"{K1},{K1}", "listed twice"),
        ("bad_id:0123456789abcdefgh", "lowercase letters or digits"),
        ("", "no keys"),
    ]:
        with pytest.raises(ConfigError, match=message):
            VerpKeyring.parse(bad)


def test_verp_keys_from_settings_file_and_generated(tmp_path: Path) -> None:
    keys_file = tmp_path / "verp.keys"
    keys_file.write_text(f"{K2}\n{K1}\n")
    from_file = VerpKeyring.from_settings(
        Settings.load({"RECAPITO_HOME": str(tmp_path), "RECAPITO_VERP_KEYS_FILE": str(keys_file)})
    )
    assert from_file.key_ids == ("k2", "k1")
    from_env = VerpKeyring.from_settings(
        Settings.load({"RECAPITO_HOME": str(tmp_path), "RECAPITO_VERP_KEYS": K1})
    )
    assert from_env.key_ids == ("k1",)
    # nothing configured: a random key, generated once and kept private under the home
    home = tmp_path / "home"
    home.mkdir()
    first = VerpKeyring.from_settings(Settings.load({"RECAPITO_HOME": str(home)}))
    path = home / "secrets" / "verp-keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = VerpKeyring.from_settings(Settings.load({"RECAPITO_HOME": str(home)}))
    assert again.keys == first.keys
    address = verp_address(7, first, "bank.example")
    assert parse_verp(address, again) == 7
    with pytest.raises(ConfigError, match="RECAPITO_VERP_KEYS_FILE"):
        Settings.load({"RECAPITO_HOME": str(home), "RECAPITO_VERP_KEYS_FILE": "/nonexistent"})
    with pytest.raises(ConfigError, match="RECAPITO_BOUNCE_DOMAIN"):
        Settings.load({"RECAPITO_HOME": str(home), "RECAPITO_BOUNCE_DOMAIN": "a@b.example"})


# -- DKIM -----------------------------------------------------------------------------------


def sandbox_dnsfunc(box: Sandbox):  # type: ignore[no-untyped-def]
    """dkimpy's DNS hook, answered by the sandbox's authoritative DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = box.dns_port
    resolver.lifetime = 5.0
    asked: list[str] = []

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        asked.append(qname.rstrip(".").lower())
        try:
            answer = resolver.resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined, no-any-return]

    lookup.asked = asked  # type: ignore[attr-defined]
    return lookup


MESSAGE = (
    b'From: "Banca Esempio" <comunicazioni@banca-esempio.test>\r\n'
    b"To: mario.rossi@mailitalia.test\r\n"
    b"Subject: Il tuo estratto conto\r\n"
    b"Date: Thu, 03 Dec 2026 10:00:00 GMT\r\n"
    b"Message-ID: <demo.1.abc@banca-esempio.test>\r\n"
    b"List-Unsubscribe: <https://banca-esempio.test/u/1>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Gentile cliente,  \r\n\r\nil tuo estratto conto e' disponibile.\r\n\r\n\r\n"
)


@pytest.mark.parametrize(
    "selector,algorithm",
    [("sandbox-rsa", b"rsa-sha256"), ("sandbox-ed25519", b"ed25519-sha256")],
)
def test_dkim_signature_verifies_against_sandbox_dns(
    sandbox: Sandbox, selector: str, algorithm: bytes
) -> None:
    key = next(k.key for k in sandbox.dkim_keys if k.key.selector == selector)
    assert key.domain == world.SENDER_DOMAIN
    one = DkimSigner([key])
    signed = one.sign(MESSAGE, "banca-esempio.test")
    dnsfunc = sandbox_dnsfunc(sandbox)
    checker = dkim.DKIM(signed)
    assert checker.verify(dnsfunc=dnsfunc)
    assert checker.signature_fields[b"a"] == algorithm
    assert checker.signature_fields[b"s"] == selector.encode()
    assert dnsfunc.asked == [f"{selector}._domainkey.banca-esempio.test"]  # type: ignore[attr-defined]
    signed_headers = [h.strip() for h in checker.signature_fields[b"h"].split(b":")]
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"list-unsubscribe"):
        assert name in signed_headers
    assert signed_headers.count(b"from") == 2  # over-signed: a second From breaks it
    # an MTA that refolds headers and trims trailing spaces does not break relaxed/relaxed
    relaxed = signed.replace(b"Subject: Il tuo", b"Subject:  Il tuo").replace(b"  \r\n", b"\r\n")
    assert dkim.verify(relaxed, dnsfunc=dnsfunc)
    # any change of content does
    assert not dkim.verify(signed.replace(b"estratto", b"Estratto"), dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"disponibile", b"disponibilE"), dnsfunc=dnsfunc)
    added_from = signed.replace(b"MIME-Version", b"From: evil@attacker.test\r\nMIME-Version")
    assert not dkim.verify(added_from, dnsfunc=dnsfunc)


def test_dkim_published_records(sandbox: Sandbox) -> None:
    # the sandbox's settings.json names the RSA key: the CLI and the demo's flows sign with it
    settings = Settings.load({"RECAPITO_HOME": str(sandbox.home)})
    assert settings.dkim_keys == sandbox.env()["RECAPITO_DKIM_KEYS"]
    default = DkimSigner.from_settings(settings).keys_for("BANCA-ESEMPIO.TEST.")
    assert [(k.selector, k.algorithm) for k in default] == [("sandbox-rsa", "rsa-sha256")]
    keys = [k.key for k in sandbox.dkim_keys]
    assert [k.algorithm for k in keys] == ["rsa-sha256", "ed25519-sha256"]
    dnsfunc = sandbox_dnsfunc(sandbox)
    for key in keys:
        published = dnsfunc(f"{key.record_name}.")
        assert published == key.public_record().encode()
    assert keys[0].public_record().startswith("v=DKIM1; k=rsa; p=MII")
    for key_file in (sandbox.sandbox_dir / "dkim").glob("*.pem"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_relaxed_body_matches_dkimpy() -> None:
    from dkim.canonicalization import Relaxed

    rng = random.Random(8463)
    pieces = [
        b"a",
        b"b",
        b" ",
        b"  ",
        b"\t",
        b" \t ",
        b"\r\n",
        b"\r\n\r\n",
        b"=20",
        b"\xc3\xa8",
        b"\r",
        b"\n",
        b" \r",
        b"\t\n",
    ]
    bodies = [b"", b"\r\n", b"\r\n\r\n", b"x", b" x \r\n", b"\t\r\n\r\n"]
    bodies += [b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(3000)]
    for body in bodies:
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_dkim_keys_setting(tmp_path: Path) -> None:
    rsa_pem = tmp_path / "rsa.pem"
    rsa_pem.write_bytes(generate_private_key_pem("rsa-sha256"))
    ed_seed = tmp_path / "ed.key"  # dkimpy's dknewkey format: the base64 seed
    ed_seed.write_text("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=\n")
    signer = DkimSigner.parse(f"bank.example:s1:{rsa_pem}, bank.example:s2:{ed_seed}")
    assert [k.algorithm for k in signer.keys_for("bank.example")] == [
        "rsa-sha256",
        "ed25519-sha256",
    ]
    # RFC 8463 §A.2's key: the public half is its published test vector
    assert (
        signer.keys_for("bank.example")[1]
        .public_record()
        .endswith("p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    )
    assert signer.sign(MESSAGE, "other.example") == MESSAGE  # no key: unchanged
    assert "PRIVATE" not in repr(signer) and "BEGIN" not in repr(signer.keys_for("bank.example"))
    for spec, message in [
        ("bank.example:s1", "domain:selector:/path"),
        (f"bank.example:s1:{tmp_path / 'missing.pem'}", "missing.pem"),
        (f"bank.example:bad selector:{rsa_pem}", "selector"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DkimSigner.parse(spec)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="PEM private key"):
        DkimSigner.parse(f"bank.example:s1:{garbage}")
    short = DkimKey.from_bytes(generate_private_key_pem("ed25519-sha256"), "bank.example", "s")
    assert short.algorithm == "ed25519-sha256"


# -- a campaign through the sandbox ---------------------------------------------------------


def _campaign(tmp_path: Path, name: str) -> CampaignParams:
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(
        "id;email;nome\n"
        + "".join(
            f"C{i};identity.{i}@{domain};Nome {i}\n"
            for i, domain in enumerate(
                ["mailitalia.test", "casella.test", "vecchiaposta.test", "postaveloce.test"] * 3
            )
        ),
        encoding="utf-8",
    )
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "template.toml").write_text(
        'subject = "Estratto conto di {{ nome }} — è pronto"\nfrom_name = "Banca Esempio"\n'
    )
    (tpl / "body.html").write_text("<p>Gentile {{ nome }},</p>\n<p>àèìòù " + "x" * 300 + "</p>")
    return CampaignParams(
        name=name,
        contacts=str(contacts),
        template=str(tpl),
        sender="comunicazioni@banca-esempio.test",
        tls_policy="opportunistic",
    )


def test_campaign_messages_are_signed_and_bounce_back_to_their_delivery(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "RECAPITO_HOME": str(home),
        **sandbox.env(),
        "RECAPITO_VERP_KEYS": f"{K2},{K1}",
        # both published keys: RSA and Ed25519 signatures on every message
        "RECAPITO_DKIM_KEYS": dkim_setting(list(sandbox.dkim_keys), BOTH),
    }
    settings = Settings.load(env)
    params = _campaign(tmp_path, "identity-campaign")
    prepared = prepare(params, settings)
    results = [deliver_chunk(params, chunk, settings) for chunk in prepared.chunks]
    assert sum(r["outcomes"].get("accepted", 0) for r in results) == 12

    ledger = Ledger(settings.db_url)
    rows = {str(r["id"]): r for r in ledger.deliveries_of(prepared.campaign_id)}
    ledger.close()
    stored = [
        m
        for m in iter_maildirs(sandbox.maildir_root)
        if m.header("X-Recapito-Campaign") == params.name
    ]
    assert len(stored) == 12 and {m.delivery_id for m in stored} == set(rows)

    ring = VerpKeyring.from_settings(settings)
    dnsfunc = sandbox_dnsfunc(sandbox)
    for message in stored:
        delivery = int(message.delivery_id or "0")
        # MAIL FROM (the Return-Path the MX wrote) is the signed VERP address of this delivery
        assert message.return_path.startswith("bounces+") and "-k2-" in message.return_path
        assert message.return_path.endswith("@banca-esempio.test")
        assert parse_verp(message.return_path, ring) == delivery
        assert parse_verp(message.return_path.upper(), ring) == delivery
        assert message.delivered_to == rows[str(delivery)]["address"]
        assert message.message_id == message_id_for(params.name, delivery, "banca-esempio.test")
        assert rows[str(delivery)]["message_id"] == message.message_id
        # both signatures (RSA and Ed25519) verify, with the keys from the sandbox DNS
        raw = message.read_bytes()
        checker = dkim.DKIM(raw)
        for idx, algorithm in enumerate((b"rsa-sha256", b"ed25519-sha256")):
            assert checker.verify(idx=idx, dnsfunc=dnsfunc), (message.path, idx)
            assert checker.signature_fields[b"a"] == algorithm
            assert checker.signature_fields[b"d"] == b"banca-esempio.test"
        assert not dkim.verify(raw.replace(b"Gentile", b"Gentila"), dnsfunc=dnsfunc)


def test_bounce_domain_setting_and_unsigned_sender(sandbox: Sandbox, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "RECAPITO_HOME": str(home),
        **sandbox.env(),
        "RECAPITO_VERP_KEYS": K1,
        "RECAPITO_BOUNCE_DOMAIN": "Bounces.Banca-Esempio.Test",
    }
    identity = SenderIdentity.from_settings(Settings.load(env))
    assert identity.return_path(5, "news@banca-esempio.test").endswith(
        "@bounces.banca-esempio.test"
    )
    # a sender domain without a key: VERP still, no signature
    from recapito.render.template import RenderedMessage

    plain = RenderedMessage("<1@x>", "s", MESSAGE.replace(b"banca-esempio.test", b"altro.test"))
    applied = identity.apply(plain, 5, "news@altro.test")
    assert applied.data == plain.data
    assert applied.envelope_from is not None
    assert parse_verp(applied.envelope_from, identity.keyring) == 5


def test_bad_dkim_key_stops_the_campaign_before_planning(sandbox: Sandbox, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "RECAPITO_HOME": str(home),
        **sandbox.env(),
        "RECAPITO_DKIM_KEYS": f"banca-esempio.test:s:{tmp_path / 'nope.pem'}",
    }
    settings = Settings.load(env)
    with pytest.raises(ConfigError, match=r"nope\.pem"):
        prepare(_campaign(tmp_path, "identity-bad-key"), settings)
    assert not (home / "recapito.db").exists()  # stopped before the ledger was touched
