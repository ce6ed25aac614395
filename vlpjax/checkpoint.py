"""The one place that saves and restores train state: an Orbax CheckpointManager.

Each step directory holds `state` (params, optimizer state, step; sharded arrays written by
every host) and `meta` (JSON: data position, step). Orbax writes into a temporary directory and
renames it on commit, so a process killed mid-save leaves the previous checkpoint intact and
the half-written one is ignored on restore.
"""
import os
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Async periodic saves, `max_to_keep`, restore onto whatever mesh the caller has."""

  def __init__(self, directory: str, *, every_steps: int, max_to_keep: int,
               async_save: bool = True):
    self.directory = directory
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # Stale temporary directories from a killed run are removed on start.
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory,
        options=options, item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def should_save(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

  def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
    """Starts an (async) save; returns once the arrays are copied off the devices."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=step))),
                       force=True)

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
    """Restores `step` with the shardings carried by `abstract_state` (ShapeDtypeStructs).

    The target shardings come from the current mesh, so a checkpoint written on one device
    layout restores onto another.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    logging.info("Restored checkpoint step %d from %s.", step, self.directory)
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    """Blocks until every pending save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry the target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
