"""``gandalf bench``: a load-test kit for any OpenAI-compatible endpoint.

Layout: :mod:`.stats` (percentiles, histograms), :mod:`.engine` (the built-in
async client: closed and open loop, per-request samples), :mod:`.wrk` (wrk,
when installed and the scenario allows), :mod:`.trivial` (a trivial HTTP server
the client's own ceiling is measured against), :mod:`.report` (text, JSON, the
self-contained HTML report, ``--compare``), :mod:`.cli` (the subcommand).

It imports nothing else from gandalf: it is a client, and must work against
any server (tests/test_layers.py).
"""

from __future__ import annotations
