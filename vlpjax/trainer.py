"""The one trainer: config -> mesh -> sharded state -> loop (steps, evals, checkpoints, metrics).

Every model family runs through it via the family interface (`vlpjax/families`).
"""
import collections
import importlib
import os
import time
from typing import Any, Dict, Iterator, Optional, Tuple

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config as config_lib
from vlpjax import init_from
from vlpjax import metrics as metrics_lib
from vlpjax import preemption
from vlpjax import prefetch
from vlpjax import sharding
from vlpjax import workdir as workdir_lib
from vlpjax.data import cache
from vlpjax.data import pipeline
from vlpjax.data import prefix_lm_pipeline
from vlpjax.data import tasks
from vlpjax.evaluators import build_evaluators, run_evaluators
from vlpjax.families import input_config
# The step is built in train_setup (no input stack); `trainer.build` stays a name for it.
from vlpjax.train_setup import Setup, build


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step."""


class InputError(RuntimeError):
  """The input pipeline failed (e.g. an undecodable record); names the step and record."""


def _next_batch(batches, step: int):
  """The next item of `batches` (here: a `DevicePrefetch`) for `step`.

  A pipeline error raised while the batch was built (in the prefetch thread, re-raised here
  in stream order) becomes an `InputError` naming the step that needed the batch.
  """
  try:
    return next(batches)
  except tf.errors.OpError as e:
    raise InputError(f"input pipeline failed building the batch of step {step}: "
                     f"{e.message.strip()}") from e


def import_data_modules(config) -> None:
  """Registers the config's seqio tasks: `data_modules`, then `input.files` if given."""
  for name in config.data_modules:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise config_lib.ConfigError(f"config.data_modules: cannot import {name!r}: {e}") from e
  if config.input.files:
    tasks.register_image_caption_tfrecord_task(config.input.task, config.input.files.to_dict())
  if config.input.cache_dir:
    # Where `seqio_cache_tasks` wrote the cache (read when input.use_cached is set).
    cache.use_cache_dir(config.input.cache_dir)


def make_train_batches(config, family, start_position: int):
  """This process's endless training batches in the family's input format."""
  index, count = jax.process_index(), jax.process_count()
  read_all = config.input.sharding == "global" and count > 1
  kwargs = dict(global_batch_size=config.global_batch_size, seed=config.seed,
                start_position=start_position, process_index=0 if read_all else index,
                process_count=1 if read_all else count)
  data_config = input_config(config, family)
  if family.input_format == "prefix_lm":
    batches = prefix_lm_pipeline.PrefixLMBatches(data_config, **kwargs)
  else:
    batches = pipeline.train_batches(data_config, **kwargs)
  return pipeline.ProcessRows(batches, index, count) if read_all else batches


def _check_batch(batch: Dict[str, np.ndarray], setup: Setup) -> None:
  local = setup.config.global_batch_size // jax.process_count()
  specs = setup.family.input_specs(local)
  for key, spec in specs.items():
    if key not in batch:
      raise ValueError(f"input batch has no {key!r} (has {sorted(batch)}); check config.input.")
    if tuple(batch[key].shape) != tuple(spec.shape):
      raise ValueError(f"input batch {key!r} has shape {batch[key].shape}, the model expects "
                       f"{spec.shape}: check config.input.pp / image_size / text_length.")


def _counted(batches) -> Iterator[Tuple[Dict[str, np.ndarray], Dict[str, int]]]:
  """(local batch, its examples per task), counted as each batch is read.

  Counted here, next to the read, because some inputs count from their own read position
  (`pipeline.ProcessRows` the last global batch, `PrefixLMBatches` the stream since the last
  call): with prefetch, asking later would count a batch read ahead instead.
  """
  for local in batches:
    yield local, batches.task_counts(local)


def _device_batches(config, setup: Setup, batches) -> prefetch.DevicePrefetch:
  """Local batches -> ((local, task counts), global sharded batch), prefetched ahead.

  `config.input.prefetch_to_device` pairs are built ahead in a background thread, so their
  host->device copies overlap the running step (0 = built synchronously in the loop).
  """
  size = config.input.prefetch_to_device
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise config_lib.ConfigError(
        f"config.input.prefetch_to_device must be an int >= 0 (batches copied to the devices "
        f"ahead of the step; 0 = none), got {size!r}.")
  first = True

  def to_device(counted):
    nonlocal first
    local, _ = counted
    if first:  # The first batch: a clear error rather than a failed copy or compile.
      _check_batch(local, setup)
      first = False
    return sharding.global_batch({k: local[k] for k in setup.batch_shardings}, setup.mesh,
                                 config.sharding_rules)

  return prefetch.DevicePrefetch(_counted(batches), to_device, size)


def _finish_on_every_device(state) -> None:
  """Waits for every shard of `state`, not only the one the host reads a value from.

  A replicated value (the step, a metric) comes from the first local device while the others
  may still be inside the step's collectives; a process that exits then can hang in its exit
  (see `sharding.process_allgather`).
  """
  jax.block_until_ready(state)


def _check_finite(step: int, scalars: Dict[str, float]) -> None:
  loss = scalars["loss"]
  if not np.isfinite(loss):
    raise NonFiniteLossError(
        f"loss is {loss} at step {step} (grad_norm {scalars.get('grad_norm')}); stopping. "
        "The last checkpoint before this step is intact. Lower optim.lr, enable "
        "optim.grad_clip_norm, or check the inputs of this step.")


class Loop:
  """Runs steps from wherever the workdir's checkpoints say, to `total_steps`."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.is_lead = True  # Known once the process has joined (or not) a multi-process run.

  def run(self) -> Dict[str, Any]:
    config, workdir = self.config, self.workdir
    # First: nothing may touch a JAX backend before the distributed runtime is up.
    sharding.maybe_initialize_distributed(config.distributed)
    self.is_lead = jax.process_index() == 0
    import_data_modules(config)
    setup = build(config)
    if self.is_lead:
      tf.io.gfile.makedirs(workdir)
      config_lib.save_json(config, os.path.join(workdir, "config.json"))
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       **config.checkpoint.to_dict())
    evaluators = build_evaluators(config, setup.family, setup.mesh)
    writer = metrics_lib.make_writer(workdir, self.is_lead)

    state, meta = self._restore_or_init(setup, ckpt)
    data_position = int(meta["data_position"])
    # Examples consumed per task since step 0 (carried in checkpoints), logged as data/*.
    self.task_counts = collections.Counter(meta.get("task_counts", {}))
    start = int(state["step"])
    batches = make_train_batches(config, setup.family, data_position)
    # Bad records skipped so far by the pipeline's reads, which with prefetch run ahead of the
    # steps by up to input.prefetch_to_device batches (+1 held by the thread): the logged
    # count may include those. data_position, and so a resume, comes from the step count,
    # so reading ahead never moves it.
    self.skipped = batches.skipped
    device_input = _device_batches(config, setup, batches)
    progress = metrics_lib.Progress(config.total_steps, config.global_batch_size, start,
                                    quiet=not self.is_lead)
    watch = preemption.PreemptionWatch()
    self.eval_seconds = 0.0
    t_start = time.perf_counter()
    results: Dict[str, Any] = {}
    # (step, device metrics, data counts at that step) not yet checked on the host.
    pending: Optional[tuple] = None

    try:
      step, calls = start, 0
      while step < config.total_steps:
        count = self._steps_in_call(step, evaluators, ckpt)
        items = [_next_batch(device_input, step + i + 1) for i in range(count)]
        for (_, counts), _ in items:
          self.task_counts.update(counts)  # Of the batches these steps train on.
        if count == 1:
          state, step_metrics = setup.train_step(state, items[0][1])
        else:
          state, step_metrics = setup.train_steps(state, [batch for _, batch in items])
        first, step = step == start, step + count
        done = step
        # Check the previous call's metrics while this one runs: no stall in the loop.
        if pending is not None:
          self._handle_metrics(*pending, progress, writer)
        pending = (done, count, step_metrics, self._data_scalars())
        if first:
          jax.block_until_ready(state["step"])
          progress.start(done)
          logging.info("First step compiled and ran.")
        # Counted in calls, which every host makes alike: the agreed stop must be a point the
        # loop passes, and with several steps per call not every step is one.
        calls += 1
        preempted = watch.reached(calls)
        save = ckpt.should_save(done, config.total_steps) or preempted
        if save or self._eval_due(evaluators, done):
          self._handle_metrics(*pending, progress, writer)  # never save a NaN state
          pending = None
          if save:
            ckpt.save(done, state, {"data_position": data_position + done - start,
                                    "task_counts": dict(self.task_counts)})
            self._say(f"checkpoint saved at step {done}")
          if preempted:
            ckpt.wait()
            _finish_on_every_device(state)
            raise preemption.PreemptedError(
                f"preempted (SIGTERM) at step {done}: checkpoint {done} is committed in "
                f"{workdir}; re-run the same command to resume.")
          results.update(self._run_evals(evaluators, state, done, writer, ckpt))
      if pending is not None:
        self._handle_metrics(*pending, progress, writer)
      _finish_on_every_device(state)
    finally:
      device_input.close()  # First: a stop (NaN, preemption, Ctrl-C) must not wait on it.
      watch.close()
      ckpt.close()
      writer.flush()
    results["final_step"] = int(state["step"])
    if start >= config.total_steps:
      self._say(f"nothing to do: the checkpoint at step {start} already reached total_steps="
                f"{config.total_steps} (raise --config.total_steps to train further)")
    else:
      total = time.perf_counter() - t_start
      self._say(f"done: steps {start}..{config.total_steps} in {metrics_lib.duration(total)} "
                f"({metrics_lib.duration(total - self.eval_seconds)} training incl. "
                f"compilation, {metrics_lib.duration(self.eval_seconds)} evals); "
                f"workdir {workdir}")
      self._say(f"data: examples per task {dict(self.task_counts)}; bad records skipped "
                f"{self.skipped.counts or 0}")
    results["state"] = state
    return results

  def _restore_or_init(self, setup: Setup, ckpt):
    latest = ckpt.latest_step()
    if latest is None:
      logging.info("No checkpoint in %s: starting from scratch.", self.workdir)
      state = setup.init_state()
      if hasattr(setup.family, "pretrained"):
        # e.g. a Hugging Face LM as the VLM's decoder; placed onto the params' shardings.
        params = setup.family.pretrained(state["params"], self.config)
        state["params"] = jax.device_put(params, setup.state_shardings["params"])
      if self.config.init_from.path:
        # Taken params come back as full host arrays (every host reads them), the rest stay
        # the sharded fresh arrays: nothing is gathered, so this works on any mesh.
        params, lines = init_from.merge_init_params(state["params"], self.config.init_from)
        state["params"] = jax.tree.map(
            lambda v, s: jax.device_put(v, s) if isinstance(v, np.ndarray) else v,
            params, setup.state_shardings["params"])
        if self.is_lead:
          print("\n".join(lines), flush=True)
      return state, {"data_position": 0}
    target = checkpoint_lib.abstract_with_shardings(setup.abstract_state,
                                                    setup.state_shardings)
    state, meta = ckpt.restore(latest, target)
    self._say(f"resuming from checkpoint step {latest}")
    return state, meta

  def _say(self, line: str) -> None:
    """Progress for the person at the console: from one process, not from every host."""
    if self.is_lead:
      print(line, flush=True)

  def _steps_in_call(self, step: int, evaluators, ckpt) -> int:
    """How many steps the next call runs: `steps_per_call`, or 1 where that would pass a step
    at which the loop must stop between calls (log, eval, checkpoint, the last step).

    Two call sizes at most, so at most two compiled programs; boundaries that are multiples of
    `steps_per_call` never need the single step.
    """
    count, total = self.config.steps_per_call, self.config.total_steps
    if count == 1 or step + count > total:
      return 1
    for done in range(step + 1, step + count):
      if (done % self.config.log_every_steps == 0 or ckpt.should_save(done, total)
          or self._eval_due(evaluators, done)):
        return 1
    return count

  def _handle_metrics(self, step, count, device_metrics, data_scalars, progress, writer):
    """Checks the metrics of the `count` steps that ended at `step`; logs the last if due."""
    if count > 1:  # Metrics stacked over the call's steps: every step's loss is checked.
      stacked = {k: np.asarray(v) for k, v in device_metrics.items()}
      for i in range(count):
        _check_finite(step - count + 1 + i, {k: v[i] for k, v in stacked.items()})
      device_metrics = {k: v[-1] for k, v in stacked.items()}
    scalars = metrics_lib.to_host_scalars(device_metrics)
    _check_finite(step, scalars)
    if step % self.config.log_every_steps == 0 or step == self.config.total_steps:
      rate = progress.rate(step)
      writer.write_scalars(step, {**{f"train/{k}": v for k, v in {**scalars, **rate}.items()},
                                  **data_scalars})
      progress.report(step, scalars, rate)

  def _data_scalars(self) -> Dict[str, float]:
    """Examples read per task and bad records skipped (by reason), since step 0."""
    out = {f"data/examples/{task}": n for task, n in self.task_counts.items()}
    skipped = self.skipped.counts
    out["data/skipped"] = sum(skipped.values())
    out.update({f"data/skipped/{reason}": n for reason, n in skipped.items()})
    return out

  @staticmethod
  def _eval_due(evaluators, step) -> bool:
    return any(e.every_steps and step % e.every_steps == 0 for e in evaluators.values())

  def _run_evals(self, evaluators, state, step, writer, ckpt) -> Dict[str, Dict[str, float]]:
    final = step == self.config.total_steps
    due = {name: e for name, e in evaluators.items()
           if final or (e.every_steps and step % e.every_steps == 0)}
    if not due:
      return {}
    t0 = time.perf_counter()
    results = run_evaluators(due, state["params"], step, writer)
    self.eval_seconds += time.perf_counter() - t0
    if self.is_lead:
      # Beside the step's checkpoint when one was saved now: let the async save (which ran
      # while the evals did) commit first, so the JSON lands in the committed directory.
      if ckpt.should_save(step, self.config.total_steps):
        ckpt.wait()
      workdir_lib.write_eval_results(self.workdir, step, results)
    return results
