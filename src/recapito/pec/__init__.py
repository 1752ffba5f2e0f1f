"""PEC (posta elettronica certificata): channel rules, mailboxes, submission, receipts.

The core of the PEC channel, free of Prefect like the rest of ``recapito``:

- ``recapito.pec.rules``: ordered rules (TOML or YAML) choosing the channel (pec / email)
  and the PEC mailbox of every recipient; each decision names the rule that fired;
- ``recapito.pec.mailboxes``: the sender's PEC mailboxes (plain dataclasses; the tasks
  layer builds them from Prefect blocks, the sandbox from its settings file);
- ``recapito.pec.submit``: SMTPS submission, one recipient per message, paced per mailbox.
"""
