"""Collectors: mailboxes the product reads back (bounces now, PEC receipts later)."""
