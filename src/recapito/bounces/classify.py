"""One classification table for every bounce path: send-time SMTP replies and returned DSNs.

``classify(code, status, text, provider)`` turns what a remote server said into a reason of
DESIGN §7 with its permanence, scope and a confidence. Evidence is weighed in this order:

1. the provider table: codes or wordings that mean something particular at one provider
   (Gmail, Microsoft, Yahoo/AOL, Apple, …);
2. the text, English and Italian (the first rule that matches wins, specific rules first);
3. the enhanced status code (RFC 3463 subject/detail), skipping the "nothing to say"
   fillers ``X.0.0``;
4. the basic reply code;
5. ``unknown`` — which no action ever suppresses on.

The rules are written for this project from the RFCs and from what the MTAs are known to
say; they are not a copy of any other classifier's tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REASONS: tuple[str, ...] = (
    "user_unknown",
    "domain_invalid",
    "mailbox_moved",
    "mailbox_disabled",
    "mailbox_full",
    "recipient_policy",
    "message_too_large",
    "content_rejected",
    "spam_rejected",
    "reputation_block",
    "auth_failure",
    "sender_rejected",
    "relay_denied",
    "insecure_channel",
    "rate_limited",
    "greylisted",
    "remote_temporary",
    "expired",
    "complaint",
    "auto_reply",
    "delayed_warning",
    "unknown",
)

# what a reason is about: the address, its domain, us as a sender, or this message
SCOPE: dict[str, str | None] = {
    "user_unknown": "recipient",
    "domain_invalid": "domain",
    "mailbox_moved": "recipient",
    "mailbox_disabled": "recipient",
    "mailbox_full": "recipient",
    "recipient_policy": "recipient",
    "message_too_large": "message",
    "content_rejected": "message",
    "spam_rejected": "message",
    "reputation_block": "sender",
    "auth_failure": "sender",
    "sender_rejected": "sender",
    "relay_denied": "sender",
    "insecure_channel": "domain",
    "rate_limited": "sender",
    "greylisted": "sender",
    "remote_temporary": "domain",
    "expired": "domain",
    "complaint": "recipient",
    "auto_reply": "recipient",
    "delayed_warning": None,
    "unknown": None,
}

# permanence when neither a reply code nor a status class says it
_DEFAULT_PERMANENCE: dict[str, str | None] = {
    "user_unknown": "permanent",
    "domain_invalid": "permanent",
    "mailbox_moved": "permanent",
    "mailbox_disabled": "permanent",
    "mailbox_full": "temporary",
    "recipient_policy": "permanent",
    "message_too_large": "permanent",
    "content_rejected": "permanent",
    "spam_rejected": "permanent",
    "reputation_block": "temporary",
    "auth_failure": "permanent",
    "sender_rejected": "permanent",
    "relay_denied": "permanent",
    "insecure_channel": "permanent",
    "rate_limited": "temporary",
    "greylisted": "temporary",
    "remote_temporary": "temporary",
    "expired": "permanent",
    "complaint": None,
    "auto_reply": None,
    "delayed_warning": "temporary",
    "unknown": None,
}

# reasons that say the address itself is dead: a "hard" bounce (suppress at once)
HARD_REASONS = frozenset({"user_unknown", "domain_invalid", "mailbox_moved"})

# confidence of each kind of evidence
CONF_PROVIDER = 0.95
CONF_TEXT = 0.9
CONF_STATUS = 0.75
CONF_REPLY = 0.5
CONF_UNKNOWN = 0.1


@dataclass(frozen=True)
class Verdict:
    reason: str
    permanence: str | None
    scope: str | None
    confidence: float

    def as_tuple(self) -> tuple[str, str | None, str | None, float]:
        return (self.reason, self.permanence, self.scope, self.confidence)


def _rx(*alternatives: str) -> re.Pattern[str]:
    # matched against lower-cased text: much faster than re.IGNORECASE
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


# ---- the text table ----------------------------------------------------------------------
# Ordered: the first matching rule wins, so the narrow, unambiguous wordings come before the
# broad ones ("spam" in a sentence about a blocklist is a reputation block, not content).
TEXT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        # a message that breaks RFC 5322 (several From addresses, repeated headers): the
        # message is refused, whatever the remote adds about spam
        "content_rejected",
        _rx(
            r"not rfc ?5322 compliant",
            r"multiple addresses in from",
            r"duplicate header",
            r"there are multiple (subject|from|to|date|message-id)",
        ),
    ),
    (
        "spam_rejected",
        _rx(
            r"(rejected|blocked|refused) (due to|because of|as) (spam|junk)",
            r"spam classification",
            r"message content rejected",
            r"\bube\b",
        ),
    ),
    (
        # the sending host has no (or a mismatching) reverse DNS name, or is refused as a
        # host: about us as a sender, whatever SMTP command it came after
        "reputation_block",
        _rx(
            r"reverse dns",
            r"(reverse|rdns|ptr)( record)?( lookup)?( for [^ ]+ [^ ]+)? (fail|missing|not|mismatch"
            r"|required|does)",
            r"(no|missing|without|valid|bad|invalid) (ptr|rdns|reverse)",
            r"dns ptr",
            r"mismatches client ip",
            r"invalid ip for sending",
            r"use the smtp server of your isp",
            r"banned sending ip",
            r"blocked using",
            r"not accepting connections",
        ),
    ),
    (
        "insecure_channel",
        _rx(
            r"must issue a starttls",
            r"starttls (is )?(required|needed)",
            r"requires? (a )?(secure|encrypted|tls) (connection|transport|channel)",
            r"(tls|encryption) (is )?(required|needed|mandatory)",
            r"tls (negotiation|handshake) failed",
            r"(does not|doesn't) support (tls|starttls)",
            r"\bmta-sts\b",
            r"connessione (sicura|cifrata) (richiesta|obbligatoria)",
        ),
    ),
    (
        "greylisted",
        _rx(
            r"gr[ae]y[ -]?list",
            r"temporarily (deferred|rejected) for (grey|gray)",
            r"please retry in \d+ seconds",
        ),
    ),
    (
        "auth_failure",
        _rx(
            r"\bspf\b.{0,40}\b(fail|failed|failure|hard ?fail|soft ?fail|check|record|none)",
            r"sender policy framework",
            r"\bdmarc\b",
            r"\bdkim\b.{0,40}\b(fail|failed|failure|invalid|required|signature)",
            r"(not|failed to) pass(ed)? (the )?(authentication|sender authentication)",
            r"authentication checks? (failed|did not pass)",
            r"unauthenticated (email|mail|sender)",
            r"authentication (is )?required",
            r"authrequired",
            r"smtp auth(entication)?",
            r"not authenticated",
            r"sender (is )?not authorized by",
            r"is not allowed to send mail from",
            r"mittente non autorizzato",
            r"autenticazione (richiesta|fallita|non riuscita)",
        ),
    ),
    (
        "mailbox_full",
        _rx(
            r"mail ?box (is |was )?(full|over|exceed)",
            r"mail ?box (size )?(limit|quota)",
            r"(over|exceed(ed|s)?|reached|past) (the |its |his |her |their )?"
            r"(storage |disk |mailbox |mail )?(quota|allocation)",
            r"quota (exceeded|full|violation)",
            r"over ?quota",
            r"insufficient (disk )?space (in|for) (the )?(mail ?box|user)",
            r"(user|account|recipient) (is )?(over|exceeded|has exceeded)",
            r"(box|inbox|account) (is )?full",
            r"full mail ?box",
            r"not enough (storage|space) (in|for)",
            r"exceeded storage allocation",
            r"storage (limit )?exceeded",
            r"casella (di posta )?(piena|colma|satura)",
            r"quota (superata|esaurita)",
            r"(ha )?superato (la|il) (quota|limite)",
            r"spazio (su disco )?(esaurito|insufficiente)",
            r"mailbox voll",
            r"mail ?folder is full",
        ),
    ),
    (
        "message_too_large",
        _rx(
            r"(message|mail|e-?mail)( size)? (is |was )?(too (big|large|long)|exceeds?)",
            r"exceeds? (the )?(maximum |max\.? |fixed |local )?(message |allowed |permitted )?"
            r"size",
            r"size (limit|exceeded)",
            r"message length exceeds",
            r"(message|file) too (big|large)",
            r"messaggio troppo (grande|grosso|voluminoso)",
            r"dimension[ei] (del messaggio|massima)",
        ),
    ),
    (
        "mailbox_moved",
        _rx(
            r"(user|mailbox|recipient|address|account) (has )?moved",
            r"no longer (at|with|valid|available|in use|active)",
            r"indirizzo (cambiato|trasferito)",
        ),
    ),
    (
        "mailbox_disabled",
        _rx(
            r"(account|mail ?box|user|address|recipient)( has been| is| was)?( temporarily)? "
            r"(disabled|suspended|deactivated|inactive|locked|frozen|closed|expired|blocked"
            r"|not active|unavailable due to inactivity)",
            r"(disabled|suspended|inactive|deactivated|closed|expired) (account|mail ?box|user)",
            r"(account|mailbox) (is )?(currently )?not (active|enabled|in service)",
            r"temporar(il)?y locked",
            r"(casella|utenza|account|utente)( di posta)? (temporaneamente )?"
            r"(disattivat|sospes|disabilitat|bloccat|chius|scadut)[ao]",
        ),
    ),
    (
        "domain_invalid",
        _rx(
            r"host (or domain name )?not found(?!, try again)",
            r"host [a-z0-9-]+(\.[a-z0-9-]+)+ not found(?!, try again)",
            r"\b\d{3} [a-z0-9-]+(\.[a-z0-9-]+)+ does not exist",
            r"not accepting network messages",
            r"unrout(e)?able address",
            r"couldn't find any host named",
            r"indicated no smtp service",
            r"domain is not reachable",
            r"(unknown|unresolvable|unroutable|unrouteable|invalid) (host|domain|mail domain)",
            r"host ?unknown",
            r"domain (name )?(does not|doesn't|doesnt) exist",
            r"no such (domain|host)",
            r"domain (is )?(not found|unknown|invalid|not valid)",
            r"no (mx|mail exchanger|valid mx|mx or a) (record|host)s?",
            r"null mx",
            r"(host|domain) does not (accept|receive) (e-?)?mail",
            r"doesn't receive e-?mail",
            r"does not accept mail",
            r"not accepting (any )?mail",
            r"domain (has )?no (mx|mail)",
            r"dominio (inesistente|sconosciuto|non (esiste|valido|trovato))",
        ),
    ),
    (
        "remote_temporary",
        _rx(
            r"name service error",
            r"dns error",
            r"dns (lookup|resolution) (failure|failed|error)",
            r"malformed address",
            r"\bmailer error\b",
            r"host not found, try again",
        ),
    ),
    (
        "relay_denied",
        _rx(
            r"relay(ing)? (access )?(denied|not (permitted|allowed)|prohibited|refused)",
            r"(not permitted|unable|not allowed|cannot|can't) (to )?relay",
            r"we do not relay",
            r"relay not permitted",
            r"no relaying",
            r"not a gateway",
            r"not configured to relay",
            r"inoltro (non consentito|negato)",
        ),
    ),
    (
        "rate_limited",
        _rx(
            r"too many (connections|concurrent|simultaneous|sessions|messages|recipients|mails"
            r"|emails|errors)",
            r"(rate|connection|sending|message) limit(ed|s)? (exceeded|reached)",
            r"rate[ -]limit",
            r"exceeded (the )?(rate|sending|connection)",
            r"throttl",
            r"slow down",
            r"too (fast|frequent)",
            r"frequency limited",
            r"receiving mail at a rate",
            r"(unusual|unexpected) (rate|volume)",
            r"temporarily deferred due to (unexpected )?volume",
            r"troppi (messaggi|invii|collegamenti|destinatari)",
        ),
    ),
    (
        "sender_rejected",
        _rx(
            r"sender (address |domain )?(rejected|refused|denied|invalid|unknown|blocked)",
            r"(domain|address) of sender",
            r"sender (verify|verification|address verification) failed",
            r"(invalid|unknown|bad|unverified) sender",
            r"sender (domain )?(does not|doesn't) exist",
            r"(from|sender|envelope) address (is )?(rejected|invalid|not allowed|refused)",
            r"responsible address",
            r"(mail from|return[- ]path) (rejected|invalid|refused)",
            r"(don't|do not|not) have permission to post",
            r"not allowed to post",
            r"not a member of this (mailing )?list",
            r"(only|not) (accept|accepting) (mail|messages) from",
            r"sender not (allowed|permitted|authorized)",
            r"mittente (rifiutato|non valido|sconosciuto|bloccato)",
        ),
    ),
    (
        "user_unknown",
        _rx(
            r"user ?unknown",
            r"recipient address rejected(\.|: access denied|: invalid user| \(in reply)",
            r"unknown (user|recipient|local[- ]part|mailbox|address|account)",
            r"no such (user|mail ?box|recipient|address|account|person|local user)",
            r"(user|recipient|address|mail ?box|account|addressee) (does not|doesn't|doesnt"
            r"|did not|not) exists?",
            r"(user|recipient|address|mail ?box|account|addressee) (was |is )?(not found|unknown"
            r"|invalid|not valid|not recogni[sz]ed|not listed)",
            r"not listed in",
            r"invalid (final delivery )?userid",
            r"no such user here",
            r"(user|recipient) (does not|doesn't) have an? [\w.-]+ account",
            r"(invalid|bad|unknown|non-?existent|nonexistent) (recipient|mail ?box|address|user)",
            r"recipient name is not recognized",
            r"no valid recipients",
            r"@[a-z0-9.-]+>?(\.\.\.)?:? does not exist",
            r"not a (valid|known) (user|recipient|mail ?box|address)",
            r"no mail ?box here by that name",
            r"(address|mailbox|user|recipient) (lookup|verification) failed",
            r"mailbox unavailable",
            r"undeliverable address",
            r"no such address",
            r"is not a registered",
            r"unknown or illegal alias",
            r"(user|recipient|address) (is )?(not|no longer) (found|known|valid)",
            r"the email account that you tried to reach does not exist",
            r"utente (sconosciuto|inesistente|non (esiste|trovato|valido))",
            r"indirizzo (inesistente|sconosciuto|non (valido|esistente|esiste|trovato))",
            r"casella (inesistente|sconosciuta|non (esiste|esistente|trovata|valida))",
            r"destinatario (sconosciuto|inesistente|non (valido|esiste|trovato))",
            r"non esiste",
        ),
    ),
    (
        "reputation_block",
        _rx(
            r"black ?list",
            r"block ?list",
            r"\bdnsbl\b",
            r"\brbl\b",
            r"spamhaus|spamcop|barracudacentral|sorbs|uceprotect|mailspike|senderscore",
            r"(listed|blocked) (on|in|at|by) ",
            r"\breputation\b",
            r"(client|your|sending|connecting|remote) (ip|host|server|address|network)"
            r"( address)? (has been |is |was )?(blocked|banned|black|rejected|not allowed)",
            r"\b(ip|host|server|network)( address)? (has been |is |was )?"
            r"(blocked|banned|black|rejected|not allowed)",
            r"client host rejected",
            r"(reverse|rdns|ptr|reverse dns|reverse lookup)( record)? "
            r"(lookup )?(fail|missing|not|mismatch|required|does)",
            r"(no|missing|without|valid) (ptr|rdns|reverse dns|reverse)",
            r"cannot find your (hostname|reverse)",
            r"(does not|doesn't) resolve to your (address|ip)",
            r"(ip|host)name (is )?(not|doesn't|does not) (resolve|match)",
            r"dynamic (ip|address|pool|range)",
            r"residential (ip|address)",
            r"access denied\W*(ip|client|host)",
            r"connection refused by",
            r"ip (address )?(non autorizzato|bloccato|in black ?list)",
        ),
    ),
    (
        "spam_rejected",
        _rx(
            r"\bspam\b",
            r"spam(my|like|-like)?",
            r"\bjunk\b",
            r"unsolicited",
            r"bulk (e-?)?mail",
            r"\buce\b",
            r"classified as (bulk|junk|suspicious)",
            r"phish",
            r"posta indesiderata",
        ),
    ),
    (
        "content_rejected",
        _rx(
            r"virus|malware|infected|trojan|worm",
            r"(attachment|file)( type)? (is )?(not allowed|blocked|forbidden|prohibited|rejected)",
            r"(content|message) (was )?(rejected|refused|not allowed|blocked) (because|due|for)",
            r"content (filter|policy|restriction)",
            r"(message|content) contains",
            r"\brfc ?(2822|5322|822|5321|2821)\b",
            r"not (rfc )?compliant",
            r"(bare|naked) (lf|linefeed|cr)",
            r"header (error|syntax|is missing|missing|invalid)",
            r"(missing|invalid|malformed|duplicate) (message-id|header|date|from|subject)",
            r"8-?bit",
            r"line too long",
            r"its content presents",
            r"contenuto (non consentito|rifiutato|bloccato)",
        ),
    ),
)

# Broad wordings ("policy", "refused", "temporary failure"): they say less than a specific
# enhanced status code, so they are weighed after it.
WEAK_TEXT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "expired",
        _rx(
            r"(retry|delivery|queue) (time(out)?|period|lifetime) (was |has )?"
            r"(exceeded|expired|reached)",
            r"(message|mail) (has )?expired",
            r"(could not|couldn't|unable to) be delivered (within|for|in) \d+",
            r"too long in (the )?queue",
            r"(has been|was) in (the )?queue too long",
            r"giving up on",
            r"could not deliver for the last",
            r"delivery failed \d+ attempts",
            r"envelope expired",
            r"(have|has) been failing for a long time",
            r"after multiple retries",
            r"did not accept our requests to connect",
            r"retry time not reached for any host",
            r"retry timeout exceeded",
            r"scadut[oa] (il tempo|la consegna)",
        ),
    ),
    (
        "recipient_policy",
        _rx(
            r"polic(y|ies)",
            r"filter(ed|ing)?",
            r"(refused|rejected|blocked|denied) by (the )?(recipient|user|addressee|owner)",
            r"(not (authorized|allowed|permitted) to receive)",
            r"access denied",
            r"(administrative|administratively) (prohibit|denied)",
            r"prohibited",
            r"refused",
            r"not accepted",
            r"not allowed",
            r"rifiutat[oa] (dal destinatario|per policy)",
            r"non (accettato|consentito)",
        ),
    ),
    (
        "remote_temporary",
        _rx(
            r"(system|internal|server|local|temporary|transient) (error|failure|problem)",
            r"temporar(y|ily)",
            r"service (is )?(currently )?(not )?(available|unavailable)",
            r"try (again )?later",
            r"insufficient (system )?(storage|resources)",
            r"(connection|network) (refused|timed out|reset|lost|error|unreachable|failure)",
            r"timed out",
            r"time ?out",
            r"mail loop|loops? (back|detected)|too many hops|routing loop|loop alert",
            r"duplicated message-id",
            r"(resources|memory) (temporarily )?(unavailable|exhausted)",
            r"mail(er)? (system|program) (error|failure)",
            r"command (not implemented|unrecognized|parameter)",
            r"(improper|bad) sequence of commands",
            r"syntax error",
            r"protocol (error|violation)",
            r"riprova(re)? più tardi",
            r"errore (temporaneo|interno|di sistema)",
        ),
    ),
)

# ---- enhanced status codes (RFC 3463 / RFC 5248 subject.detail) -------------------------
STATUS_RULES: dict[str, str] = {
    "1.1": "user_unknown",
    "1.2": "domain_invalid",
    "1.3": "user_unknown",
    "1.4": "user_unknown",
    "1.5": "user_unknown",
    "1.6": "mailbox_moved",
    "1.7": "sender_rejected",
    "1.8": "sender_rejected",
    "1.9": "relay_denied",
    "1.10": "domain_invalid",
    "2.1": "mailbox_disabled",
    "2.2": "mailbox_full",
    "2.3": "message_too_large",
    "2.4": "remote_temporary",
    "3.1": "remote_temporary",
    "3.2": "remote_temporary",
    "3.3": "content_rejected",
    "3.4": "message_too_large",
    "3.5": "remote_temporary",
    "4.0": "remote_temporary",
    "4.1": "remote_temporary",
    "4.2": "remote_temporary",
    "4.3": "remote_temporary",
    "4.4": "domain_invalid",
    "4.5": "remote_temporary",
    "4.6": "remote_temporary",
    "4.7": "expired",
    "4.8": "insecure_channel",
    "5.0": "remote_temporary",
    "5.1": "remote_temporary",
    "5.2": "remote_temporary",
    "5.3": "rate_limited",
    "5.4": "remote_temporary",
    "5.5": "remote_temporary",
    "5.6": "content_rejected",
    "6.0": "content_rejected",
    "6.1": "content_rejected",
    "6.2": "content_rejected",
    "6.3": "content_rejected",
    "6.4": "content_rejected",
    "6.5": "content_rejected",
    "6.6": "content_rejected",
    "6.7": "content_rejected",
    "6.8": "content_rejected",
    "6.9": "content_rejected",
    "6.10": "content_rejected",
    "7.1": "recipient_policy",
    "7.2": "recipient_policy",
    "7.3": "recipient_policy",
    "7.4": "auth_failure",
    "7.5": "auth_failure",
    "7.6": "auth_failure",
    "7.7": "content_rejected",
    "7.8": "auth_failure",
    "7.9": "auth_failure",  # RFC 3463: authentication mechanism too weak
    "7.10": "insecure_channel",
    "7.11": "insecure_channel",
    "7.12": "auth_failure",
    "7.13": "mailbox_disabled",
    "7.14": "recipient_policy",
    "7.15": "auth_failure",
    "7.16": "message_too_large",
    "7.17": "mailbox_disabled",
    "7.18": "mailbox_disabled",
    "7.19": "mailbox_disabled",
    "7.20": "auth_failure",
    "7.21": "auth_failure",
    "7.22": "auth_failure",
    "7.23": "auth_failure",
    "7.24": "auth_failure",
    "7.25": "reputation_block",
    "7.26": "auth_failure",
    "7.27": "domain_invalid",
    "7.28": "rate_limited",
    "7.29": "auth_failure",
    "7.30": "auth_failure",
}

# ---- basic reply codes (RFC 5321 §4.2.3) -------------------------------------------------
REPLY_RULES: dict[int, str] = {
    421: "remote_temporary",
    450: "remote_temporary",
    451: "remote_temporary",
    452: "mailbox_full",
    454: "remote_temporary",
    521: "domain_invalid",
    523: "message_too_large",
    530: "auth_failure",
    535: "auth_failure",
    551: "mailbox_moved",
    552: "mailbox_full",
    553: "user_unknown",
    556: "domain_invalid",
}

# ---- provider table ----------------------------------------------------------------------
# (provider, enhanced status or None, text pattern or None, reason): a code or a wording
# that one provider uses in its own sense. Checked before everything else.
PROVIDER_RULES: tuple[tuple[str, str | None, re.Pattern[str] | None, str], ...] = (
    # Gmail: 5.7.26 and 5.7.30 are authentication (SPF/DKIM/DMARC) failures, 4.7.28 /
    # 5.7.28 a rate of unsolicited mail from the sending IP, 5.7.1 "unsolicited" a block.
    ("google", "7.26", None, "auth_failure"),
    ("google", "7.30", None, "auth_failure"),
    ("google", "7.28", None, "rate_limited"),
    ("google", "4.5", re.compile(r"rate|try again later", re.I), "rate_limited"),
    ("google", "2.1", re.compile(r"disabled|inactive", re.I), "mailbox_disabled"),
    ("google", "1.1", None, "user_unknown"),
    ("google", "7.1", re.compile(r"unsolicited|rate|spam", re.I), "spam_rejected"),
    ("google", "7.1", re.compile(r"ip.*(reputation|poor)", re.I), "reputation_block"),
    (
        "google",
        None,
        re.compile(r"groups\.google|googlegroups|google groups|'send mail as'", re.I),
        "sender_rejected",
    ),
    # Microsoft (Exchange Online, Outlook.com, Hotmail)
    ("microsoft", "7.708", None, "reputation_block"),
    ("microsoft", "7.705", None, "reputation_block"),
    ("microsoft", "7.606", None, "reputation_block"),
    ("microsoft", "7.511", None, "reputation_block"),
    ("microsoft", "7.57", None, "auth_failure"),
    ("microsoft", "7.509", None, "auth_failure"),
    ("microsoft", "7.23", None, "auth_failure"),
    ("microsoft", "4.316", None, "remote_temporary"),
    ("microsoft", "4.317", None, "insecure_channel"),
    ("microsoft", "7.321", None, "insecure_channel"),
    ("microsoft", "7.322", None, "insecure_channel"),
    ("microsoft", "7.323", None, "insecure_channel"),
    ("microsoft", "7.324", None, "insecure_channel"),
    ("microsoft", "7.325", None, "insecure_channel"),
    ("microsoft", "4.1", re.compile(r"access denied", re.I), "user_unknown"),
    ("microsoft", "2.2", None, "mailbox_full"),
    ("microsoft", None, re.compile(r"\b(S3140|S3150|S3115)\b"), "reputation_block"),
    ("microsoft", None, re.compile(r"mailbox unavailable", re.I), "user_unknown"),
    # Yahoo / AOL (Yahoo Inc.): TSS codes
    ("yahoo", None, re.compile(r"\bTS(S0[1-9]|0[1-3])\b"), "rate_limited"),
    ("yahoo", "7.9", None, "recipient_policy"),
    ("yahoo", None, re.compile(r"\bdmarc\b", re.I), "auth_failure"),
    # Apple iCloud
    ("apple", "7.1", re.compile(r"blocked|reputation|unsolicited", re.I), "reputation_block"),
)

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_FILLERS = frozenset({"0.0", "0.1", "0.2", "0.3"})


def status_subject_detail(status: str | None) -> str | None:
    """``"5.1.1"`` → ``"1.1"``; None for anything else."""
    if not status:
        return None
    parts = status.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return f"{int(parts[1])}.{int(parts[2])}"


def find_status(text: str) -> str | None:
    """The first enhanced status code in a text (``"5.1.1"``), or None."""
    match = _ENHANCED.search(text)
    return ".".join(match.groups()) if match else None


def text_reason(text: str, *, weak: bool = False) -> str | None:
    """The reason the text table gives (the broad wordings with ``weak``), or None."""
    if not text:
        return None
    low = text.lower()
    for reason, pattern in WEAK_TEXT_RULES if weak else TEXT_RULES:
        if pattern.search(low):
            return reason
    return None


def _provider_reason(provider: str | None, detail: str | None, text: str) -> str | None:
    if not provider:
        return None
    key = provider.lower()
    for name, code, pattern, reason in PROVIDER_RULES:
        if name != key:
            continue
        if code is not None and code != detail:
            continue
        if pattern is not None and not pattern.search(text):
            continue
        return reason
    return None


def _permanence(code: int | None, status: str | None, reason: str) -> str | None:
    klass = None
    if status and status[0] in "245":
        klass = status[0]
    elif code is not None and 200 <= code < 600:
        klass = str(code)[0]
    if klass == "5":
        return "permanent"
    if klass == "4":
        return "temporary"
    if klass == "2":
        return None
    return _DEFAULT_PERMANENCE.get(reason)


def classify(
    code: int | None, status: str | None, text: str, provider: str | None = None
) -> tuple[str, str | None, str | None, float]:
    """(reason, permanence, scope, confidence) for one recipient's failure."""
    if status is None and text:
        status = find_status(text)
    detail = status_subject_detail(status)
    reason = _provider_reason(provider, detail, text)
    confidence = CONF_PROVIDER
    if reason is None:
        reason, confidence = text_reason(text), CONF_TEXT
    if reason is None and detail is not None and detail not in _FILLERS:
        reason, confidence = STATUS_RULES.get(detail), CONF_STATUS
    if reason is None:
        reason, confidence = text_reason(text, weak=True), CONF_TEXT - 0.2
    if reason is None and code is not None:
        reason, confidence = REPLY_RULES.get(code), CONF_REPLY
    if reason is None:
        reason, confidence = "unknown", CONF_UNKNOWN
    temporary = (status or str(code or ""))[:1] == "4"
    if temporary and reason == "recipient_policy" and detail == "7.1":
        reason = "greylisted"  # 4.7.1 on first contact: the classic greylisting answer
    if temporary and reason == "unknown":
        reason, confidence = "remote_temporary", CONF_REPLY
    permanence = _permanence(code, status, reason)
    return reason, permanence, SCOPE.get(reason), confidence


def verdict(
    code: int | None, status: str | None, text: str, provider: str | None = None
) -> Verdict:
    return Verdict(*classify(code, status, text, provider))


def is_hard(reason: str, permanence: str | None) -> bool:
    """A hard bounce: the address (or its domain) is dead, so it is suppressed at once."""
    return reason in HARD_REASONS and permanence != "temporary"


__all__ = [
    "HARD_REASONS",
    "REASONS",
    "SCOPE",
    "Verdict",
    "classify",
    "find_status",
    "is_hard",
    "status_subject_detail",
    "text_reason",
    "verdict",
]
