"""Deterministic per-request count of governance's cost: one of
``governance_micro.py``'s configurations driven for N chat requests (one
driver, the fake provider, the usage sink stubbed so the writer thread does
not blur the count), for callgrind:

    valgrind --tool=callgrind python bench/governance_cg.py CONFIG N

Instructions per request = (I(2000) - I(500)) / 1500, e.g. with
/work/wt/tools/cgm.sh or ``bench/governance_cg.py --cg`` (which runs both).
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from governance_micro import CONFIGS, config
from test_micro import CHAT_BODY, Driver

from gandalf.app.pipeline import Pipeline
from gandalf.domain import UsageRecord
from gandalf.wiring import create_app


class _Sink:
    def record_usage(self, record: UsageRecord) -> None:
        pass


def run(name: str, n: int) -> None:
    gc.set_threshold(20_000, 10, 10)  # as Lifecycle.worker_ready sets it
    import uvloop

    loop = uvloop.new_event_loop()
    app = create_app(config(name), access_log=False)
    loop.run_until_complete(app.startup())
    for obj in gc.get_objects():
        if isinstance(obj, Pipeline):
            obj._sink = _Sink()
    driver = Driver(app, "POST", "/v1/chat/completions", CHAT_BODY)
    loop.run_until_complete(driver.run(200))  # warm: key cache, plans, buckets
    loop.run_until_complete(driver.run(n))
    if set(driver.statuses) != {200}:
        raise SystemExit(f"{name}: statuses {driver.statuses}")
    loop.run_until_complete(app.shutdown())
    loop.close()


N1, N2 = 500, 2000
_VALGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")


def count(name: str, n: int) -> int:
    out = subprocess.run(
        [*_VALGRIND, sys.executable, __file__, name, str(n)],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return int(out.split("Collected : ")[1].split()[0])


def main() -> int:
    if sys.argv[1] == "--cg":  # --cg [CONFIG ...]: instructions per request
        names = sys.argv[2:] or list(CONFIGS)
        base = None
        for name in names:
            per = (count(name, N2) - count(name, N1)) / (N2 - N1)
            base = per if name == "off" else base
            over = f"  (+{(per - base) / 1000:.1f}k over off)" if base is not None else ""
            print(f"{name:8} {per / 1000:7.1f}k instructions per request{over}", flush=True)
        return 0
    run(sys.argv[1], int(sys.argv[2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
