import os
import uuid

from dynamo_llm.runtime.ids import new_request_id


def test_request_ids_are_distinct_uuid4_strings_across_pool_refills() -> None:
    minted = [new_request_id() for _ in range(3 * 256 + 7)]
    assert len(set(minted)) == len(minted)
    for value in minted:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_reuse_the_parents_pool() -> None:
    new_request_id()  # the pool now holds bytes the parent has not used yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child_id != new_request_id()
