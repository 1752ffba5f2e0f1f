"""Transport security toward recipient MX hosts: levels, recipient policies, decisions."""
