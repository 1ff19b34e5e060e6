"""sign_request against bare PyNaCl signing of the same signing string, in one run.

    .venv/bin/python bench/signing.py [--seconds 1.0] [--rounds 5] [--quick]

Alternates the sides in rounds so that noise on a shared machine hits all of them,
and reports the median signatures/s of each and their ratio (target >= 0.7). The
target is reported, never asserted; the exit status is 1 only when sign_request's
signature differs from PyNaCl's over the same signing string. ``--quick`` (what
``make test`` runs) uses three rounds of 0.05 s: the same code and table, too short
to be a measurement.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Callable

import nacl.signing

from backpack_vault import sign_request
from backpack_vault.backpack.signing import Signer, signing_string

PARAMS = {
    "symbol": "SOL_USDC",
    "side": "Bid",
    "orderType": "Limit",
    "timeInForce": "GTC",
    "price": "180.50",
    "quantity": "1.5",
    "clientId": 1001,
    "postOnly": True,
}
QUICK = {"seconds": 0.05, "rounds": 3}


def rate(fn: Callable[[int], object], seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn(1700000000000 + n)
            n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=f"defaults for a smoke run: {QUICK}")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(**QUICK)  # flags given explicitly still win
    args = parser.parse_args()

    key = nacl.signing.SigningKey.generate()
    api_key = base64.b64encode(bytes(key.verify_key)).decode()
    api_secret = base64.b64encode(bytes(key)).decode()
    signer = Signer(api_key, api_secret)

    def bare(ts: int) -> object:
        # The floor: the same signing string, built outside the timer, signed by PyNaCl.
        return base64.b64encode(key.sign(messages[ts % 2]).signature)

    def ours(ts: int) -> object:
        return sign_request(api_key, api_secret, "orderExecute", PARAMS, ts)

    def prepared(ts: int) -> object:
        return signer.headers("orderExecute", PARAMS, ts)

    messages = [
        signing_string("orderExecute", PARAMS, 1700000000000 + i, 5000).encode() for i in range(2)
    ]
    # What is timed must agree: Ed25519 is deterministic, so all three sign the same bytes.
    expected = base64.b64encode(key.sign(messages[0]).signature).decode()
    signed = {
        "sign_request": sign_request(api_key, api_secret, "orderExecute", PARAMS, 1700000000000),
        "Signer.headers": signer.headers("orderExecute", PARAMS, 1700000000000),
    }
    for name, headers in signed.items():
        if headers["X-Signature"] != expected:
            print(f"{name} does not sign the signing string PyNaCl signs")
            return 1
    sides: dict[str, list[float]] = {"pynacl": [], "sign_request": [], "Signer.headers": []}
    for _ in range(args.rounds):
        sides["pynacl"].append(rate(bare, args.seconds))
        sides["sign_request"].append(rate(ours, args.seconds))
        sides["Signer.headers"].append(rate(prepared, args.seconds))

    floor = statistics.median(sides["pynacl"])
    print(f"{'side':<16} {'signatures/s (median)':>22} {'ratio to pynacl':>16}")
    for name, rates in sides.items():
        median = statistics.median(rates)
        print(f"{name:<16} {median:>22,.0f} {median / floor:>16.2f}")
    ratio = statistics.median(sides["sign_request"]) / floor
    print(
        f"\nsign_request / pynacl = {ratio:.2f} (target >= 0.70): "
        f"{'ok' if ratio >= 0.7 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
