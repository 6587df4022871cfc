from __future__ import annotations

import os
import time

from mxspool.ids import _ALPHABET, new_queue_id


def test_queue_ids_are_unique_sortable_and_plain() -> None:
    ids = [new_queue_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 18 and set(i) <= set(_ALPHABET) for i in ids)
    time.sleep(0.002)
    later = new_queue_id()
    assert later[:10] > ids[0][:10]  # the millisecond prefix orders ids by arrival


def test_a_forked_child_draws_other_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next random part and leave at once
        os.write(write, new_queue_id()[10:].encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child != new_queue_id()[10:]
