"""Verify cost per request of JWT sign-in, as the gateway pays it.

``uncached``: a token seen for the first time (KeyCache.authenticate ->
TokenVerifier.verify: parse, kid lookup, joserfc signature check, claims,
identity); ``cached``: a repeat (KeyCache.from_headers: one SHA-256 and a
dict lookup, the same as a cached gnd_ key); ``gnd_ key (cached)`` for
comparison. Keys come from an in-memory JWKS (no network).

    python bench/jwt_verify.py [--n 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import time
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gandalf.auth.apikey import KeyCache
from gandalf.auth.jwt import TokenVerifier
from gandalf.domain import ApiKey, JwtIssuer

ISS = "https://idp.example.com"
GND = "gnd_" + "k" * 43


class Jwks:
    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys

    async def get_json(self, url: str) -> object:
        return {"keys": self.keys}


class OneKey:
    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        if key_hash != hashlib.sha256(GND.encode()).hexdigest():
            return None
        return ApiKey(id="k", name="k", key_hash=key_hash, prefix="gnd_kkkk")


async def main(n: int, rounds: int) -> None:
    privates: dict[str, Any] = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    algorithms = pyjwt.algorithms.get_default_algorithms()
    jwks = [
        {**algorithms[alg].to_jwk(p.public_key(), as_dict=True), "kid": alg}
        for alg, p in privates.items()
    ]
    issuer = JwtIssuer(
        issuer=ISS, audience=("gandalf",), jwks_url=ISS + "/jwks", algorithms=tuple(privates)
    )
    verifier = TokenVerifier(Jwks(jwks), [issuer], max_size=n * 2 + 10)
    await verifier.refresh_due()
    keys = KeyCache(OneKey(), tokens=verifier)
    await keys.load(GND)
    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        for alg, private in privates.items():
            now = int(time.time())
            tokens = [
                pyjwt.encode(
                    {"iss": ISS, "aud": "gandalf", "sub": f"u{i}", "exp": now + 3600},
                    private,
                    algorithm=alg,
                    headers={"kid": alg},
                ).encode()
                for i in range(n)
            ]
            headers = [b"Bearer " + t for t in tokens]
            verifier.forget_tokens()
            t0 = time.perf_counter()
            for h in headers:
                await keys.authenticate(h, None)
            results.setdefault(f"{alg} uncached", []).append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            for h in headers:
                assert keys.from_headers(h, None) is not None
            results.setdefault(f"{alg} cached", []).append((time.perf_counter() - t0) / n)
        gnd = b"Bearer " + GND.encode()
        t0 = time.perf_counter()
        for _ in range(n):
            keys.from_headers(gnd, None)
        results.setdefault("gnd_ key (cached)", []).append((time.perf_counter() - t0) / n)
    for name, runs in results.items():
        best, median = min(runs) * 1e6, statistics.median(runs) * 1e6
        print(f"{name:20s} best {best:8.2f} us  median {median:8.2f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.rounds))
