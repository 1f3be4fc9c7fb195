"""Fault injection for the tests, kept out of the training recipe: environment variables read by the loop.

    MIXCON_FAULT_NAN_AT_STEP=N           the loss of step N becomes NaN
    MIXCON_FAULT_KILL_IN_SAVE_AT_STEP=N  rank 0 is SIGKILLed while saving step N (shards written, not published)
"""

import os


def _step(name: str) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip().lstrip("-").isdigit() else -1


def nan_at_step() -> int:
    return _step("MIXCON_FAULT_NAN_AT_STEP")


def kill_in_save(step: int) -> None:
    if _step("MIXCON_FAULT_KILL_IN_SAVE_AT_STEP") == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
