"""A ccxt bot in sign mode: it trades on Backpack and never holds the API secret.

    BACKPACK_VAULT_DAEMON_URL=http://backpack-vault:8280 VAULT_ADDR=https://vault:8200 \\
    VAULT_TOKEN=<the worker's own token> python examples/ccxt_sign_mode.py scalper/bot-a

The daemon signs each request ccxt sends; the worker's Vault token needs the sign
grants for what this bot does, which ``backpack-vault policy worker`` prints::

    backpack-vault policy worker scalper --key bot-a --instruction balanceQuery \\
        --instruction orderExecute --instruction orderQueryAll --instruction orderCancel

It places one post-only buy of the smallest size at 80% of the best bid, lists
the open orders and cancels it. ``BACKPACK_URL`` points ccxt at another Backpack
(the sandbox of ``backpack-vault sandbox``, say).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import ccxt

from backpack_vault.ccxt import backpack
from backpack_vault.worker import BrokerClient

SYMBOL = "SOL/USDC"


def trade(exchange: Any) -> None:
    market = exchange.load_markets()[SYMBOL]
    print("free USDC:", exchange.fetch_balance()["USDC"]["free"])
    best_bid = exchange.fetch_order_book(SYMBOL)["bids"][0][0]
    price = float(exchange.price_to_precision(SYMBOL, best_bid * 0.8))
    amount = market["limits"]["amount"]["min"]
    order = exchange.create_order(SYMBOL, "limit", "buy", amount, price, {"postOnly": True})
    print(f"placed {order['id']}: buy {amount} {SYMBOL} at {price} ({order['status']})")
    print("open orders:", [o["id"] for o in exchange.fetch_open_orders(SYMBOL)])
    exchange.cancel_order(order["id"], SYMBOL)
    print(f"cancelled {order['id']}")
    print("secret held by this bot:", repr(exchange.secret))


def main(key: str) -> int:
    broker = BrokerClient(
        os.environ["BACKPACK_VAULT_DAEMON_URL"],
        vault_addr=os.environ["VAULT_ADDR"],
        token=os.environ["VAULT_TOKEN"],  # or token_file= (a file Vault Agent keeps fresh)
    )
    config: dict[str, Any] = {"enableRateLimit": True}
    if url := os.environ.get("BACKPACK_URL"):
        config["urls"] = {"api": {"public": url, "private": url}}
    with broker:
        try:
            trade(backpack(config, broker=broker, key=key, mode="sign"))
        except ccxt.AuthenticationError as exc:  # KeyRevoked, KeyRetired, PermissionDenied ...
            print(f"the key cannot be used: {exc.__cause__ or exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "main/bot"))
