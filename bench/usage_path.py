"""The whole usage path per record, for callgrind: ``record_usage`` then ``flush``.

Opens a SQLite store on a fresh file (``usage_linger`` 0, so every batch is
exactly what was queued before the flush: no timing decides the batching),
then queues ``N`` records in batches of ``SIZE`` through ``record_usage``
and waits for each with ``flush``. Counted under valgrind at two ``N``, the
difference per record is deterministic (unlike a served run, where the
batch size follows the machine's load): the hand-over on the loop's thread,
the writer task, the transaction on the writer connection's thread.

VARIANT: ``s<SIZE>k<KEYS>`` (``s64k1``: batches of 64, one key); a leading
``n`` (``ns64k1``) makes the records served-like: no team, no price. ::

    /work/wt/tools/cgm.sh bench/usage_path.py ns64k1 640 3200        # whole process
    valgrind --tool=callgrind --separate-threads=yes ... usage_path.py ns64k1 N   # per thread
"""

from __future__ import annotations

import sys
import tempfile

import msgspec
import uvloop
from usage_writer import _batch

from gandalf.storage.sqlite import SqliteStore


async def main(variant: str, n: int) -> None:
    keys = int(variant.split("k")[1])
    size = int(variant.split("s")[1].split("k")[0])
    store = SqliteStore(tempfile.mkdtemp() + "/usage.db", readers=1, usage_linger=0.0)
    await store.open()
    pool = [_batch(i, size, keys) for i in range(4)]
    if variant.startswith("n"):
        pool = [[msgspec.structs.replace(r, team_id=None, cost_usd=None) for r in b] for b in pool]
    warm = [_batch(10_000 + i, size, keys) for i in range(3)]
    # The records are built once and reused, so only the usage path grows with N.
    for batch in warm + [pool[i % 4] for i in range(n // size)]:
        for rec in batch:
            store.record_usage(rec)
        await store.flush()
    assert store.usage_written == (n // size + 3) * size, store.usage_written
    await store.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
