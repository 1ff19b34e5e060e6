# backpack-vault-worker-templated: the default worker grants for every AppRole role that is
# named exactly after its sub-account (role `scalper` -> sub-account scalper).
# `backpack-vault vault setup` writes it with the accessor of the AppRole mount in place
# of APPROLE_MOUNT_ACCESSOR; left in place, the template never resolves and the policy
# grants nothing. AppRole alias metadata holds only the role name, which every secret-id
# of a role shares, so a token can never gain another role's grants. The roles that
# setup creates (backpack-worker-<SUB>) use per-sub-account policies instead.
#
# Grant paths are virtual: the daemon asks Vault (sys/capabilities-self, with the
# worker's own token) whether this token holds them; nothing is mounted there.
# Workers hold no capability on the KV paths of stored keys.
#
# Signatures of read-only instructions only (the default): the daemon signs
# queries for this worker; the key never leaves the daemon, and no order,
# cancellation, withdrawal or other state change can be signed. Grant
# state-changing instructions one by one (for example orderExecute).

path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/accountQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/balanceQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/borrowHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/borrowLendPositionQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/borrowPositionHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/collateralQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/depositAddressQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/depositQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/dustHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/fillHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/fundingHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/interestHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/maxBorrowQuantity" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/maxOrderQuantity" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/maxWithdrawalQuantity" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/orderHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/orderQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/orderQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/positionHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/positionQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/quoteFillHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/quoteHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/rfqFillHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/rfqHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/settlementHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/strategyHistoryQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/strategyQuery" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/strategyQueryAll" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/subscribe" { capabilities = ["update"] }
path "backpack-broker/{{identity.entity.aliases.APPROLE_MOUNT_ACCESSOR.metadata.role_name}}/+/sign/withdrawalQueryAll" { capabilities = ["update"] }
