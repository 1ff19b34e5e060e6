# backpack-vault-daemon: the daemon (`backpack-vault serve`), the only identity that reads
# stored secrets. `backpack-vault vault setup` writes this policy with the configured KV mount,
# KV prefix and maximum wrapping TTL in place of the defaults shown here (secret, backpack,
# 300s); to write it by hand with other names, edit the paths first.

# Keys: read secret and metadata, list, and move the status (a merge PATCH of custom_metadata).
path "secret/data/backpack/*" {
  capabilities = ["read"]
}

path "secret/metadata/backpack/*" {
  capabilities = ["read", "list", "update", "patch"]
}

# Rotation and failover: the switch writes the successor's (or standby's) pair into the key
# as a new version, with check-and-set, so the name points to it in one write...
path "secret/data/backpack/+/+" {
  capabilities = ["read", "update"]
}

# ...and then deletes the successor's own copy under NAME/next.
path "secret/metadata/backpack/+/+/next" {
  capabilities = ["read", "list", "update", "patch", "delete"]
}

# The leader lease of the scheduled checks: one small document written with check-and-set.
path "secret/data/backpack-leader" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/backpack-leader" {
  capabilities = ["read"]
}

# The change feed: every status change is appended here (check-and-set) and every replica
# polls it, so a retire or revoke reaches all replicas within a second.
path "secret/data/backpack-changes" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/backpack-changes" {
  capabilities = ["read"]
}

# Wrapped copies for workers. The bound stops a bug or a bad setting from issuing long-lived
# wrapping tokens: Vault refuses any wrap TTL above it (BACKPACK_VAULT_MAX_WRAP_TTL).
path "sys/wrapping/wrap" {
  capabilities     = ["update"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "300s"
}

# Revoke unclaimed wrapping tokens when a key is revoked or retired.
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}

# Its own token. The default policy grants these too; they are listed so that the daemon
# also works with a token issued without the default policy.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "sys/capabilities-self" {
  capabilities = ["update"]
}
