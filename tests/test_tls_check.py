"""``recapito tls check`` on each sandbox domain prints the posture the sandbox gave it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from recapito.cli import main
from recapito.sandbox.runtime import Sandbox

EXPECTED = {
    # domain: (levels of its MX hosts, decision per policy opportunistic, L1, L2, L3, L4)
    "mailitalia.test": (["L3"], ["send", "send", "send", "send", "insecure_channel"]),
    "casella.test": (["L3"], ["send", "send", "send", "send", "insecure_channel"]),
    "aziendale.test": (["L2"], ["send", "send", "send", "insecure_channel", "insecure_channel"]),
    "studio-legale.test": (
        ["L2"],
        ["send", "send", "send", "insecure_channel", "insecure_channel"],
    ),
    "hosting-condiviso.test": (
        ["L2"],
        ["send", "send", "send", "insecure_channel", "insecure_channel"],
    ),
    "vecchiaposta.test": (["L0"], ["send"] + ["insecure_channel"] * 4),
    "doppio-mx.test": ([None, "L3"], ["send", "send", "send", "send", "defer"]),
    "nessuna-posta.test": ([], ["domain_invalid"] * 5),
    "sts-enforce.test": (["L4"], ["send"] * 5),
    "sts-enforce-mismatch.test": (["L3"], ["insecure_channel"] * 5),
    "dane-ok.test": (["L4"], ["send"] * 5),
    "dane-mismatch.test": (["L2"], ["insecure_channel"] * 5),
    "dane-bogus.test": (["L2"], ["defer"] * 5),
    "dominio-inesistente.test": ([], ["domain_invalid"] * 5),
}


@pytest.fixture
def env(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**sandbox.env(), "RECAPITO_HOME": str(tmp_path_factory.mktemp("home"))}


def test_tls_check_json_matches_the_sandbox(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["tls", "check", "--json", *EXPECTED], env=env)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["domain"] for r in lines] == list(EXPECTED)
    for r in lines:
        levels, decisions = EXPECTED[r["domain"]]
        assert [m["level"] for m in r["mx"]] == levels, r
        assert [r["decision"][k] for k in ("opportunistic", "L1", "L2", "L3", "L4")] == decisions
        assert set(r) >= {"domain", "mx", "mta_sts", "dane", "decision"}
        for mx in r["mx"]:
            assert set(mx) >= {
                "host",
                "preference",
                "level",
                "tls_version",
                "cipher",
                "certificate",
                "reason",
            }
    by_domain = {r["domain"]: r for r in lines}
    assert by_domain["aziendale.test"]["mx"][0]["certificate"] == "certificate-not-trusted"
    assert by_domain["vecchiaposta.test"]["mx"][0]["reason"] == "starttls-not-supported"
    assert by_domain["casella.test"]["mx"][0]["tls_version"] == "TLSv1.2"
    assert by_domain["sts-enforce.test"]["mta_sts"] == "enforce"
    assert by_domain["mailitalia.test"]["mta_sts"] is None
    assert by_domain["dane-ok.test"]["dane"] == "match"
    assert by_domain["dane-mismatch.test"]["mx"][0]["reason"] == "tlsa-invalid"
    assert by_domain["dane-bogus.test"]["dane"] == "bogus"
    assert by_domain["mailitalia.test"]["dane"] == "none"  # unsigned zone: DANE does not apply
    assert by_domain["sts-enforce-mismatch.test"]["mx"][0]["reason"] == "validation-failure"


def test_tls_check_text_and_one_connection_per_host(env: dict[str, str]) -> None:
    domains = ["postaveloce.test", "mailitalia.test", "doppio-mx.test"]  # share mx.tls13
    result = CliRunner().invoke(main, ["tls", "check", *domains], env=env)
    assert result.exit_code == 0, result.output
    assert "decision: opportunistic=send" in result.output
    # tls13, tls12 and the dead host: three, however many domains share them
    assert "(3 MX connection(s) opened)" in result.output


def test_tls_check_bad_dns_option_is_one_line(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["tls", "check", "--dns", "nope", "x.test"], env=env)
    assert result.exit_code != 0
    assert "--dns='nope': expected HOST:PORT" in result.output
