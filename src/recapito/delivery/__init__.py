"""E-mail delivery direct to the recipient's MX hosts."""
