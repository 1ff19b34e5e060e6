"""Vault's side: the port the domain sees, the one hvac client behind it, and setup."""
