"""Notice of preemption: save at the current step and exit, on one host or on a pod.

A preempted TPU VM (spot / maintenance) or a job scheduler stopping a run sends SIGTERM and
allows some seconds before SIGKILL. The trainer asks `reached(n)` after every call of the train
step (the n-th call; one step each unless `steps_per_call` > 1); once it says yes, the trainer
saves a checkpoint at the step it reached, waits for it to commit and exits, so a restart loses
no steps.

- One process: a SIGTERM handler sets a flag; the end of the running call sees it.
- Several processes: every host must save the *same* step (an Orbax save is a collective).
  JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any
  host, agrees on a call all hosts have not passed yet, and `reached_preemption_sync_point`
  says yes on every host after that call (the same step: every host makes the same calls).
  No Python handler is installed then: it would take the signal away from JAX's.
"""
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptedError(RuntimeError):
  """Training stopped early on a preemption notice, after checkpointing its step."""

  exit_code = 128 + signal.SIGTERM  # What schedulers expect of a job stopped by SIGTERM.


class PreemptionWatch:
  """`reached(n)`: True once a preemption notice says the n-th call should be the last."""

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None
    self._multi_process = jax.process_count() > 1
    if self._multi_process:
      from jax._src import distributed  # pylint: disable=g-import-not-at-top
      if distributed.global_state.preemption_sync_manager is None:
        logging.warning("JAX's preemption service is off (jax_enable_preemption_service): "
                        "SIGTERM will kill this multi-process run without a checkpoint.")
        self._multi_process = None
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._signalled.set()

  def reached(self, call: int) -> bool:
    if self._multi_process:
      # Collective in the background, not here: a cheap local check every call.
      return multihost_utils.reached_preemption_sync_point(call)
    return self._signalled.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
