# OpenBao for the compose demo (deploy/compose.yaml): one node of integrated storage ("raft")
# on a named volume, plain HTTP reachable only on the compose network (and 127.0.0.1:8200 on
# the host). OpenBao 2.x has no "file" storage backend and never uses mlock.
#
# A new server starts uninitialised and every start is sealed: the compose job `openbao-init`
# (deploy/openbao/init.py) initialises it with ONE unseal key and unseals it on each start.
# That is for a demo only. In production: TLS on the listeners, three or five raft nodes,
# auto-unseal (a cloud KMS or a transit seal), several key shares held by different people,
# and a root token revoked once setup is done.

ui           = false
api_addr     = "http://openbao:8200"
cluster_addr = "http://openbao:8201"

storage "raft" {
  path                   = "/openbao/file" # the image's data directory, on the openbao-data volume
  node_id                = "openbao-1"
  performance_multiplier = 1 # production timing: a leader is elected in about a second
}

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}
