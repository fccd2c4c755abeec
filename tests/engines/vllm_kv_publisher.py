"""vLLM's own KV event publisher, alone: run with the vLLM venv's python (no model, no engine).

``python vllm_kv_publisher.py PORT REPLAY_PORT``: binds vLLM's ``ZmqEventPublisher`` (PUB on
PORT, ROUTER on REPLAY_PORT), prints ``ready``, then for each ``store`` line on stdin publishes a
``KVEventBatch`` with one ``BlockStored`` of one 2-token block, chained on the previous one, and
prints ``stored N``. It stops at end of input. What ``test_kv_publisher.py`` follows.
"""

from __future__ import annotations

import sys
import time

from vllm.distributed.kv_events import (  # type: ignore[import-not-found]
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)


def main() -> None:
    port, replay_port = int(sys.argv[1]), int(sys.argv[2])
    publisher = ZmqEventPublisher(
        0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://*:{replay_port}"
    )
    print("ready", flush=True)
    parent = None
    for n, line in enumerate(sys.stdin, start=1):
        if line.strip() != "store":
            continue
        block = BlockStored(
            block_hashes=[n],
            parent_block_hash=parent,
            token_ids=[n, n],
            block_size=2,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        publisher.publish(KVEventBatch(ts=time.time(), events=[block]))
        parent = n
        print(f"stored {n}", flush=True)
    publisher.shutdown()


if __name__ == "__main__":
    main()
