"""Reading a `vlpjax.train` workdir back: its config, its checkpoints' params, eval results.

Layout (written by the trainer):
  WORKDIR/config.json                          the effective config of the run
  WORKDIR/checkpoints/<step>/{state,meta}      Orbax train state (params, optimizer, step)
  WORKDIR/checkpoints/<step>/eval_results.json evals of that step's params (train or evaluate)
  WORKDIR/eval_results/<step>.json             evals of a step that has no checkpoint
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/  every logged scalar

Used by everything that starts from a finished (or running) training run: eval-only runs
(`vlpjax.evaluate`), captioning (`vlpjax.predict`) and export (`tools.export_checkpoint`).
"""
import json
import os
from typing import Any, Dict, Optional, Tuple

import tensorflow as tf

from vlpjax import config as config_lib

EVAL_RESULTS_FILE = "eval_results.json"
EVAL_RESULTS_DIR = "eval_results"  # For steps without a checkpoint.


def read_config(workdir: str, overrides=()) -> config_lib.ConfigDict:
  """The run's config.json, finalized (defaults filled in, `overrides` applied and checked)."""
  path = os.path.join(workdir, "config.json")
  if not tf.io.gfile.exists(path):
    raise ValueError(f"{workdir} has no config.json: is it a vlpjax.train workdir?")
  with tf.io.gfile.GFile(path) as f:
    return config_lib.finalize(config_lib.ConfigDict(json.load(f)), overrides)


def checkpointer(workdir: str):
  """The run's checkpoints, read-only: safe while the run is still training."""
  from vlpjax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)


def resolve_step(ckpt, step: Optional[int], workdir: str) -> int:
  """`step`, or the latest, after checking that checkpoint exists."""
  steps = ckpt.all_steps()
  chosen = ckpt.latest_step() if step is None else step
  if chosen is None or chosen not in steps:
    raise ValueError(f"no checkpoint {'at all' if step is None else f'at step {step}'} in "
                     f"{workdir}/checkpoints (have {sorted(steps)}).")
  return chosen


def restore_params(workdir: str, setup, step: Optional[int] = None) -> Tuple[Any, int]:
  """(params of checkpoint `step` (default: latest) on `setup`'s shardings, the step)."""
  ckpt = checkpointer(workdir)
  try:
    step = resolve_step(ckpt, step, workdir)
    target = abstract_params(setup)
    return ckpt.restore_params(step, target), step
  finally:
    ckpt.close()


def abstract_params(setup):
  """The params' ShapeDtypeStructs carrying their shardings on `setup`'s mesh."""
  from vlpjax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  return checkpoint_lib.abstract_with_shardings(setup.abstract_state["params"],
                                                setup.state_shardings["params"])


def eval_results_path(workdir: str, step: int) -> str:
  """Beside the checkpoint of `step` when there is one, else under WORKDIR/eval_results/."""
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  if tf.io.gfile.isdir(os.path.join(step_dir, "state")):
    return os.path.join(step_dir, EVAL_RESULTS_FILE)
  return os.path.join(workdir, EVAL_RESULTS_DIR, f"{step}.json")


def write_eval_results(workdir: str, step: int, results: Dict[str, Dict[str, float]]) -> str:
  """Merges `results` ({evaluator: {metric: value}}) into the step's JSON; returns its path.

  Merging (not overwriting) lets an eval-only run of one evaluator keep the others' numbers.
  The file is written to a temporary name and renamed, so a killed process leaves either the
  old or the new file, never half of one.
  """
  path = eval_results_path(workdir, step)
  merged: Dict[str, Any] = {"step": int(step)}
  if tf.io.gfile.exists(path):
    merged.update(read_eval_results(path))
  merged.update({name: {k: float(v) for k, v in values.items()}
                 for name, values in results.items()})
  tf.io.gfile.makedirs(os.path.dirname(path))
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(merged, indent=2, sort_keys=True))
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def read_eval_results(path: str) -> Dict[str, Any]:
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)
