"""What bots import: the broker client and its ``httpx.Auth``."""
