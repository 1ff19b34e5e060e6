# backpack-vault-operator: people who run `backpack-vault keys add|generate|list|show|retire|
# delete|rotate`. They store keys, inspect and retire them, but never read a stored secret back:
# only the daemon does. `backpack-vault vault setup` writes this policy with the configured KV
# mount and prefix in place of the defaults shown here (secret, backpack).
#
# Setting up Vault itself (`backpack-vault vault setup`: mounts, policies, auth roles) needs an
# administrator's token, not this policy.

# Store a key (check-and-set: create only) and write new versions of it. No "read".
path "secret/data/backpack/*" {
  capabilities = ["create", "update", "delete"]
}

# List, inspect, describe (custom_metadata), retire (merge PATCH) and delete keys.
path "secret/metadata/backpack/*" {
  capabilities = ["create", "read", "update", "patch", "delete", "list"]
}

# The change feed: retire, revoke, reinstate and delete append to it, so every replica of
# the daemon refuses a retired or revoked key within a second.
path "secret/data/backpack-changes" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/backpack-changes" {
  capabilities = ["read"]
}
