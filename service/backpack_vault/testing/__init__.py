"""What users' tests and ours import: the sandbox exchange and small test helpers."""
