# backpack-vault-metadata-reader: dashboards, auditors and on-call people who list keys and
# read their status (`keys list`, `keys show`) but can never read a secret. Everything that is
# not secret lives in the KV custom_metadata. `backpack-vault vault setup` writes this policy
# with the configured KV mount and prefix in place of the defaults shown here (secret, backpack).

path "secret/metadata/backpack/*" {
  capabilities = ["read", "list"]
}
