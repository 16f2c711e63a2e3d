"""JOSE library choice for JWT sign-in: verify cost of PyJWT and joserfc.

Each library verifies the same tokens (RS256 2048-bit, ES256 P-256, EdDSA
Ed25519) with every check the gateway makes (signature, exp, nbf, iss, aud,
an algorithm allowlist), from a key already parsed out of the JWKS (the
gateway parses JWKS once per refresh, not per token). Also the import time of
each library in a fresh interpreter.

    python bench/jwt_libs.py [--n 2000] [--rounds 5]

Prints microseconds per verification (best and median round) and import ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

ISSUER = "https://idp.example.com"
AUDIENCE = "gandalf"


def _keys() -> dict[str, object]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


def _claims() -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "nbf": now - 10,
        "exp": now + 3600,
        "org_id": "acme",
    }


def cases() -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    for alg, private in _keys().items():
        token = pyjwt.encode(_claims(), private, algorithm=alg, headers={"kid": "k1"})  # type: ignore[arg-type]
        public = private.public_key()  # type: ignore[attr-defined]
        jwk = {
            **pyjwt.algorithms.get_default_algorithms()[alg].to_jwk(public, as_dict=True),
            "kid": "k1",
        }
        pyjwk = pyjwt.PyJWKSet.from_dict({"keys": [jwk]})["k1"]

        def py(token: str = token, key: Any = pyjwk.key, alg: str = alg) -> object:
            pyjwt.get_unverified_header(token)
            return pyjwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=60,
                options={"require": ["exp", "iss", "aud"]},
            )

        keyset = KeySet.import_key_set({"keys": [jwk]})
        registry = JWTClaimsRegistry(
            leeway=60,
            iss={"essential": True, "value": ISSUER},
            aud={"essential": True, "value": AUDIENCE},
            exp={"essential": True},
        )
        algs = ["Ed25519" if alg == "EdDSA" else alg, alg]

        def jose(
            token: str = token,
            keyset: KeySet = keyset,
            algs: list[str] = algs,
            registry: JWTClaimsRegistry = registry,
        ) -> object:
            decoded = jose_jwt.decode(token, keyset, algorithms=algs)
            registry.validate(decoded.claims)
            return decoded.claims

        out[f"pyjwt {alg}"] = py
        out[f"joserfc {alg}"] = jose
    return out


def import_ms(module: str) -> float:
    code = (
        f"import time; t=time.perf_counter(); import {module}; print((time.perf_counter()-t)*1e3)"
    )
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(5)
    ]
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    table = cases()
    for fn in table.values():
        fn()  # every case verifies before it is timed
    results: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(args.rounds):
        for name, fn in table.items():
            t0 = time.perf_counter()
            for _ in range(args.n):
                fn()
            results[name].append((time.perf_counter() - t0) / args.n * 1e6)
    for name, runs in results.items():
        print(f"{name:16s} best {min(runs):8.1f} us  median {statistics.median(runs):8.1f} us")
    for module in ("jwt", "joserfc.jwt"):
        print(f"import {module}: {import_ms(module):.1f} ms")


if __name__ == "__main__":
    main()
