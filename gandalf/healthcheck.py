"""``python -m gandalf.healthcheck``: exit 0 when the local gateway is ready, else 1.

For a container's HEALTHCHECK (the slim image has no curl): GETs ``/readyz`` on the
address ``gandalf serve`` listens on, taken from ``$GANDALF_ADDR`` (the Containerfile
sets it), else ``127.0.0.1:8080``. A wildcard host (``0.0.0.0``, ``::``) is asked on
its loopback. One line on stderr says why when it is not ready.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from gandalf.config import split_addr

TIMEOUT = 3.0  # seconds; below the HEALTHCHECK's own --timeout
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def ready_url(env: Mapping[str, str]) -> str:
    """The ``/readyz`` URL for the address in ``env`` (``ValueError`` if malformed)."""
    host, port = split_addr(env.get("GANDALF_ADDR") or "127.0.0.1:8080")
    host = _LOOPBACK.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/readyz"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    del argv  # no options
    try:
        url = ready_url(os.environ if env is None else env)
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except (OSError, ValueError) as exc:
        print(f"gandalf healthcheck: not ready: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"gandalf healthcheck: not ready: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
