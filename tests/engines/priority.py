"""The frontend under test is scheduled ahead of the engines: its session's autogroup at nice -19.

The suite runs engines and frontends on the same two cores, each process in a session of its
own (``start_new_session``). With the kernel's autogroups on (the default here), a session is
one scheduling entity: a process's own nice only ranks it within its session, and every session
competes at the same weight. A generating vLLM then leaves every other session runnable and not
running for seconds, the frontend's included: its event loop and granian's thread learnt of a
client's hang-up seconds late, and vLLM generated on for nobody (the README's real-engine
section has the measurements; issue 9). The frontend needs under 3 % of a core while it relays,
so putting it first costs the engines almost nothing; lowering the engines instead would slow
them against every other process too.

Raising a priority needs ``CAP_SYS_NICE`` (root, as in CI): without it, or without autogroups,
:func:`prioritise` returns False and the frontend runs as it is.
"""

from __future__ import annotations

from pathlib import Path

FRONTEND_AUTOGROUP_NICE = -19
_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")


def prioritise(pid: int) -> bool:
    """Put the session (autogroup) of ``pid``, a session leader, at
    :data:`FRONTEND_AUTOGROUP_NICE`; False when the kernel has no autogroups on or the
    priority may not be raised."""
    try:
        if _ENABLED.read_text().strip() != "1":
            return False
        Path(f"/proc/{pid}/autogroup").write_text(f"{FRONTEND_AUTOGROUP_NICE}\n")
    except OSError:
        return False
    return True
