#!/bin/sh
# Freqtrade under `backpack-vault exec`: the key reaches Freqtrade through its own
# FREQTRADE__EXCHANGE__KEY / FREQTRADE__EXCHANGE__SECRET variables (never a config
# file, never argv). exec restarts Freqtrade when the key rotates and stops it
# (exit 6) when the key is retired or revoked.
#
# The worker logs in to Vault by itself; here with AppRole, the role-id and
# secret-id mounted as files. Set these before running:
#   BACKPACK_VAULT_DAEMON_URL   e.g. http://backpack-vault:8280
#   VAULT_ADDR                  e.g. https://vault:8200
#   BACKPACK_VAULT_WORKER_ROLE_ID_FILE, BACKPACK_VAULT_WORKER_SECRET_ID_FILE
# FREQTRADE (default: freqtrade) and FREQTRADE_CONFIG (default: config.json) pick
# the command and its config.
set -eu

: "${BACKPACK_VAULT_WORKER_AUTH:=approle}"
export BACKPACK_VAULT_WORKER_AUTH

exec backpack-vault exec "${BACKPACK_KEY:-scalper/freqtrade}" \
    --preset freqtrade \
    --on-change rotated=restart \
    -- "${FREQTRADE:-freqtrade}" trade --config "${FREQTRADE_CONFIG:-config.json}"
