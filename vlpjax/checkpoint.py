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
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Async periodic saves, `max_to_keep`, restore onto whatever mesh the caller has."""

  def __init__(self, directory: str, *, every_steps: int = 0, max_to_keep: Optional[int] = None,
               async_save: bool = True, read_only: bool = False):
    self.directory = directory
    self.every_steps = every_steps
    if read_only:
      # Readers (eval-only runs, export, init_from) may look at a run that is still training:
      # they must neither delete its in-flight temporary save nor rotate its checkpoints.
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             cleanup_tmp_directories=False)
    else:
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

  def restore_params(self, step: int, abstract_params: Optional[Any] = None) -> Any:
    """Only the params of `step` (no optimizer state is read).

    Onto `abstract_params`' shardings, or, without a target, as host numpy arrays shaped as
    stored. Evaluation and export need a third of what a full restore reads (AdamW keeps two
    moments per param), so a 3B model evaluates on hosts that could not hold its train state.
    """
    if step not in self.all_steps():
      raise ValueError(f"no checkpoint at step {step} in {self.directory} "
                       f"(have {sorted(self.all_steps())}).")
    # Read the `state` item directly: the manager's handler for it is the StandardCheckpoint
    # one, which cannot leave out subtrees.
    path = os.path.join(str(self._manager.directory), str(step), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
      if abstract_params is None:
        metadata = checkpointer.metadata(path).item_metadata["params"]
        abstract_params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                       metadata)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    abstract_params)
      else:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item={"params": abstract_params}, restore_args={"params": restore_args},
          partial_restore=True))
    logging.info("Restored params of checkpoint step %d from %s.", step, self.directory)
    return restored["params"]

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


def save_params(directory: str, params: Any) -> None:
  """A params-only Orbax checkpoint (the `orbax` export format, `tools.import_checkpoint`)."""
  directory = os.path.abspath(directory) if "://" not in directory else directory
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, params)


def load_params(directory: str, abstract_params: Optional[Any] = None) -> Any:
  """Params saved by `save_params`: onto `abstract_params`' shardings, or as host arrays."""
  directory = os.path.abspath(directory) if "://" not in directory else directory
  with ocp.StandardCheckpointer() as checkpointer:
    if abstract_params is None:
      # Without a target Orbax would restore onto the shardings the saver had; a params file
      # moves between machines, so read plain numpy arrays instead.
      metadata = checkpointer.metadata(directory).item_metadata
      abstract_params = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
      restored = checkpointer.restore(directory, abstract_params)
      return jax.tree.map(np.asarray, restored)
    return checkpointer.restore(directory, abstract_params)


def read_params_from(path: str, step: Optional[int] = None) -> Tuple[Any, str]:
  """Host numpy params of `path`: a params directory (`save_params`) or a train workdir.

  For a workdir, the checkpoint at `step` (default: the latest) is read, params only. Returns
  (params, a description of what was read, for logs).
  """
  if _exists(os.path.join(path, "checkpoints")):
    ckpt = Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
    try:
      chosen = ckpt.latest_step() if step is None else step
      if chosen is None:
        raise ValueError(f"no checkpoint at all in {ckpt.directory}.")
      return ckpt.restore_params(chosen), f"{path} step {chosen}"
    finally:
      ckpt.close()
  if step is not None:
    raise ValueError(f"{path} is a params directory, not a workdir: it has no steps.")
  return load_params(path), path


def _exists(path: str) -> bool:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gs:// paths)
  return tf.io.gfile.exists(path)
