"""The one place that builds batches: seqio task/mixture + pp string -> numpy.

Data config fields (an ml_collections.ConfigDict or anything with `.get`):
  task            seqio Task or Mixture name
  split           split name, e.g. "train" / "validation"
  pp              pp op string, see vlpjax.data.preprocessors (may be "")
  text_length     `texts` is truncated / padded with 0 to this length
  shuffle_buffer  examples in each task's shuffle buffer
  keys            optional; features to keep (default: image, texts)
  threads         optional; tf.data's own thread pool size (default: one per
                  core), to leave cores to the training loop on small machines;
                  parallel maps then run that wide, without autotuning
  bad_records     optional; "error" (default) or "skip" (see bad_records.py)
  use_cached      optional; read the tasks' offline (Beam) cache (see cache.py)

A Mixture is sampled here by its rates (position p's task depends only on the
seed and p), so every batch says which task each example came from
(`task_index`) and the bad-record policy knows the task it reports.

Task names are looked up after `import data_mixtures`, done here on a miss, so
the embedded tasks always resolve; tasks of other modules must be registered
(the trainer imports `config.data_modules`) before the first call.

Determinism and resumption: with a fixed seed the stream of examples is fixed
(seqio shuffles with the seed, tf.data keeps order), and each example's pp seed is
derived from the run seed and its position in the stream, not from any state. So
`train_batches(..., start_position=k)` skips k local batches of examples and then
yields exactly what an uninterrupted iterator yields from its k-th batch on. The
skip is not free: the skipped examples still go through the task's preprocessors
(decoding included; pp ops are skipped), so resuming at step k costs about
k * local_batch decodes (~12k examples/s for 64 px shapes on 2 CPU cores, so
about 1.5 min per million; larger real images are slower). Resumption is exact
for the same seed, global batch size, process count and data.
"""
import importlib
import logging
import math
from typing import Dict, Iterator, List, Optional, Sequence

from absl import logging as absl_logging
import numpy as np
import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import cache
from vlpjax.data import mixing
from vlpjax.data import preprocessors
from vlpjax.registry import unknown_name_message

# TF is only the input pipeline here; if it saw the GPUs it would reserve their
# memory that JAX needs. Fails harmlessly if TF already initialized its devices.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass

DEFAULT_KEYS = ("image", "texts")
# Distinguishes pp seeds from the shuffle seed drawn from the same run seed.
_PP_SALT = 0x5EED
_EVAL_SEED = 0
_counts_cache: Dict[tuple, List[int]] = {}


class _DropUncachedFunctionDatasetWarning(logging.Filter):
  """seqio warns on every train iterator over a FunctionDataSource that it should be cached.

  For in-memory generated data (the embedded demo sets) there is nothing to cache and the
  example-level shuffle is already complete, so the warning is only noise.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return "uncached FunctionDataset" not in record.getMessage()


absl_logging.get_absl_logger().addFilter(_DropUncachedFunctionDatasetWarning())


def get_provider(name: str):
  """The seqio Task or Mixture `name`; unknown names list the nearest ones."""
  names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if name not in names:
    try:
      importlib.import_module("data_mixtures")
    except ModuleNotFoundError as e:  # An installed vlpjax without the repo's tasks.
      if e.name != "data_mixtures":
        raise
    names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if name not in names:
    raise ValueError(unknown_name_message("seqio task or mixture", name, names) +
                     " Is the module that registers it in the config's data_modules?")
  return seqio.get_mixture_or_task(name)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"the {process_count} processes.")
  return global_batch_size // process_count


class TrainBatches:
  """Endless local batches; also the input statistics the trainer logs.

  `task_names[i]` is the task of examples whose `task_index` is i (every batch
  carries `task_index` int32 [b]); `skipped` counts records dropped under
  `input.bad_records='skip'`, by reason, as they are read (read-ahead included).
  """

  def __init__(self, ds: tf.data.Dataset, task_names: Sequence[str],
               skipped: bad_records.SkipCounter):
    self.task_names = list(task_names)
    self.skipped = skipped
    self._iterator = ds.as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return next(self._iterator)

  def task_counts(self, batch: Dict[str, np.ndarray]) -> Dict[str, int]:
    """Examples of each task in `batch`."""
    counts = np.bincount(batch["task_index"], minlength=len(self.task_names))
    return {name: int(n) for name, n in zip(self.task_names, counts)}


class ProcessRows:
  """`input.sharding="global"`: this process's rows of every global batch.

  Every process reads the whole stream of global batches (as a 1-process run would) and
  keeps rows [i*b, (i+1)*b). The batches a run trains on then do not depend on the number
  of hosts: a run resumed on another host count, or checked against a single-host run, sees
  exactly the same examples. The price is that every host decodes every example, so this is
  for small-scale reproducibility (and data with fewer files than hosts), not for pods.
  """

  def __init__(self, global_batches, process_index: int, process_count: int):
    self._batches = global_batches
    self._index, self._count = process_index, process_count
    self.skipped = global_batches.skipped
    self._last_global = None

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._batches)
    self._last_global = batch
    rows = len(next(iter(batch.values()))) // self._count
    return {k: v[self._index * rows:(self._index + 1) * rows] for k, v in batch.items()}

  def task_counts(self, batch: Dict[str, np.ndarray]) -> Dict[str, int]:
    """Per-task counts of the whole global batch (every process sees it)."""
    del batch
    return self._batches.task_counts(self._last_global)


def task_dataset(data_config, task_name: str, *, shuffle: bool, seed: int,
                 num_epochs: Optional[int], process_index: int, process_count: int,
                 skipped: Optional[bad_records.SkipCounter] = None,
                 sequence_length: Optional[Dict[str, int]] = None) -> tf.data.Dataset:
  """One task's records for this process, with the run's bad-record policy applied.

  Every input path (two-tower batches, packed prefix-LM batches, tools) reads a
  task through here, so sharding, caching and the bad-record policy are the same.
  """
  task = seqio.get_mixture_or_task(task_name)
  use_cached = bool(data_config.get("use_cached", False))
  if use_cached:  # seqio would fall back silently or fail with a bare assertion.
    cache.check_cached(task_name, data_config.split)
  kwargs = dict(
      sequence_length=sequence_length, split=data_config.split, shuffle=shuffle, seed=seed,
      num_epochs=num_epochs, use_cached=use_cached,
      shard_info=(seqio.ShardInfo(process_index, process_count)
                  if process_count > 1 else None))
  if shuffle:
    kwargs["shuffle_buffer_size"] = data_config.shuffle_buffer
  ds = task.get_dataset(**kwargs)
  return bad_records.apply_policy(
      ds, policy=data_config.get("bad_records", "error"), task=task_name,
      split=data_config.split, counter=skipped or bad_records.SkipCounter())


def _mixture_choices(rates: Sequence[float], seed: int) -> tf.data.Dataset:
  """Endless task indices; the choice at position p depends only on (seed, p)."""
  logits = tf.math.log(tf.constant([rates], tf.float32))

  def choose(position):
    sample = tf.random.stateless_categorical(logits, 1, seed=tf.stack(
        [tf.constant(seed, tf.int64), position]))
    return tf.cast(sample[0, 0], tf.int64)

  return tf.data.Dataset.counter().map(choose)


def _task_dataset(data_config, *, shuffle: bool, seed: int, num_epochs: Optional[int],
                  process_index: int, process_count: int,
                  skipped: Optional[bad_records.SkipCounter] = None):
  """(records of the task or mixture with `task_index`, task names).

  A mixture is sampled by rate here, not by seqio.Mixture, so each task gets the
  bad-record policy with its own name and every example says which task it is
  from (per-task counts). One pass (num_epochs=1, evaluation) reads the tasks one
  after the other instead.
  """
  members = mixing.members(data_config.task, get_provider)
  sequence_length = {"texts": data_config.text_length}
  datasets = []
  for i, member in enumerate(members):
    ds = task_dataset(data_config, member.task, shuffle=shuffle, seed=seed + i,
                      num_epochs=num_epochs, process_index=process_index,
                      process_count=process_count, skipped=skipped,
                      sequence_length=sequence_length)
    datasets.append(ds.map(lambda f, i=i: {**f, "task_index": tf.constant(i, tf.int32)}))
  names = [m.task for m in members]
  specs = {name: ds.element_spec for name, ds in zip(names, datasets)}
  if len({repr(sorted(spec.items())) for spec in specs.values()}) > 1:
    raise ValueError(f"the tasks of mixture {data_config.task!r} yield different features "
                     f"and cannot be batched together: {specs}")
  if len(datasets) == 1:
    return datasets[0], names
  if num_epochs is not None:
    combined = datasets[0]
    for ds in datasets[1:]:
      combined = combined.concatenate(ds)
    return combined, names
  choices = _mixture_choices([m.rate for m in members], seed)
  return tf.data.Dataset.choose_from_datasets(datasets, choices), names


def _select(features: Dict[str, tf.Tensor], keys: Sequence[str], text_length: int):
  """Keeps `keys` with the output dtypes and a fixed `texts` length."""
  missing = [k for k in keys if k not in features]
  if missing:
    raise ValueError(f"data keys {missing} are not in the examples; "
                     f"available: {sorted(features)}.")
  out = {}
  for k in keys:
    v = features[k]
    if k == "texts":
      v = tf.cast(preprocessors.pad_to_length(v, text_length), tf.int32)
    elif k == "image":
      v = tf.cast(v, tf.float32)
    elif k in ("label", "task_index"):
      v = tf.cast(v, tf.int32)
    out[k] = v
  return out


def with_options(ds: tf.data.Dataset, data_config) -> tf.data.Dataset:
  """`ds` with the tf.data options of every pipeline here (`threads`: tf.data's own pool)."""
  options = tf.data.Options()
  options.deterministic = True  # The default, stated: resumption relies on it.
  threads = data_config.get("threads", None)
  if threads:
    options.threading.private_threadpool_size = threads
    # No autotuning in a pinned pool. A pool of `threads` leaves little to tune: untuned,
    # every AUTOTUNE map runs at the smaller of `initial_parallelism` and the pool, so at
    # `threads`. And the tuning thread held up iterator deletion: with TensorFlow 2.21 it
    # often outlives a deleted iterator by what is left of its wait for the next tuning
    # round, which grows to 60 s. A pinned iterator read to its end over ~85 s took 55.6,
    # 0.0 and 52.8 s to delete, the calling thread holding the GIL (in the test workers, as
    # garbage collections of 20-75 s). tf.data's shared pool does it more rarely (one stall
    # of 12 s in four tries); there, tuning is worth keeping.
    options.autotune.enabled = False
    options.autotune.initial_parallelism = threads
  return ds.with_options(options)


def _train_dataset(data_config, *, global_batch_size: int, seed: int, start_position: int,
                   process_index: int, process_count: int,
                   skipped: Optional[bad_records.SkipCounter] = None):
  local_batch = local_batch_size(global_batch_size, process_count)
  chain = preprocessors.parse_pp(data_config.pp)  # Fail on typos before any work.
  keys = tuple(data_config.get("keys", None) or DEFAULT_KEYS) + ("task_index",)
  ds, names = _task_dataset(data_config, shuffle=True, seed=seed, num_epochs=None,
                            process_index=process_index, process_count=process_count,
                            skipped=skipped)
  base_seed = tf.constant([seed, _PP_SALT], tf.int64)

  def pp(position, features):
    # Global index: unique across processes, the same on every restart.
    index = position * process_count + process_index
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return _select(chain(features, example_seed), keys, data_config.text_length)

  ds = ds.enumerate().skip(start_position * local_batch)
  ds = ds.map(pp, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return with_options(ds, data_config), names


def train_dataset(data_config, *, global_batch_size: int, seed: int,
                  start_position: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """The dataset behind `train_batches` (for inspection tools and benchmarks)."""
  return _train_dataset(data_config, global_batch_size=global_batch_size, seed=seed,
                        start_position=start_position, process_index=process_index,
                        process_count=process_count)[0]


def train_batches(data_config, *, global_batch_size: int, seed: int,
                  start_position: int = 0, process_index: int = 0,
                  process_count: int = 1) -> TrainBatches:
  """Endless local batches (global_batch_size // process_count examples each).

  `start_position` is the number of batches already consumed (saved with the
  checkpoint); see the module docstring for how resumption stays exact.
  Yields {"image": float32 [b, H, W, 3], "texts": int32 [b, text_length],
  "task_index": int32 [b], ...}.
  """
  skipped = bad_records.SkipCounter()
  ds, names = _train_dataset(
      data_config, global_batch_size=global_batch_size, seed=seed,
      start_position=start_position, process_index=process_index,
      process_count=process_count, skipped=skipped)
  return TrainBatches(ds, names, skipped)


def _count(ds: tf.data.Dataset) -> int:
  count = int(ds.cardinality())
  if count >= 0:
    return count
  return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def count_examples(data_config, process_count: int = 1) -> List[int]:
  """Examples of `data_config.split` in each process's shard, after the task.

  Free when the source knows its size (in-memory data, or cardinality kept by
  seqio); otherwise one pass over the split, cached per process.
  """
  # Keyed by the provider object too, so a re-registered task is counted anew.
  key = (data_config.task, id(get_provider(data_config.task)), data_config.split,
         process_count)
  if key not in _counts_cache:
    _counts_cache[key] = [
        _count(_task_dataset(data_config, shuffle=False, seed=_EVAL_SEED, num_epochs=1,
                             process_index=i, process_count=process_count)[0])
        for i in range(process_count)]
  return list(_counts_cache[key])


def _padding(element_spec: Dict[str, tf.TensorSpec]) -> tf.data.Dataset:
  """An endless dataset of all-zero examples with mask False."""
  not_fixed = [k for k, s in element_spec.items() if not s.shape.is_fully_defined()]
  if not_fixed:
    raise ValueError(f"eval features {not_fixed} have no fixed shape "
                     f"({ {k: element_spec[k].shape for k in not_fixed} }); "
                     "add e.g. resize(...) to the pp string.")
  zeros = {k: (tf.fill(s.shape, "") if s.dtype == tf.string else tf.zeros(s.shape, s.dtype))
           for k, s in element_spec.items()}
  zeros["mask"] = tf.constant(False)
  return tf.data.Dataset.from_tensors(zeros).repeat()


def eval_dataset(data_config, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> tf.data.Dataset:
  """The dataset behind `eval_batches` (for inspection tools)."""
  local_batch = local_batch_size(global_batch_size, process_count)
  chain = preprocessors.parse_pp(data_config.pp)
  if chain.random_ops:
    raise ValueError(f"eval pp {data_config.pp!r} has random ops {chain.random_ops}; "
                     "use deterministic ones (e.g. resize, central_crop).")
  # Every process must run the same number of steps, or the global arrays of
  # the last steps would wait for a process that has stopped.
  counts = count_examples(data_config, process_count)
  num_batches = math.ceil(max(counts) / local_batch)
  ds, _ = _task_dataset(data_config, shuffle=False, seed=_EVAL_SEED, num_epochs=1,
                        process_index=process_index, process_count=process_count)
  keys = list(data_config.get("keys", None) or DEFAULT_KEYS)
  if "label" in ds.element_spec and "label" not in keys:
    keys.append("label")
  seed = tf.constant([_EVAL_SEED, _PP_SALT], tf.int64)  # Unused by deterministic ops.

  has_id = "id" in ds.element_spec

  def pp(features):
    out = _select(chain(features, seed), keys, data_config.text_length)
    if has_id:
      # A number per example that is the same whatever the process layout, so evaluators
      # whose result depends on example order (pairing) can put the gathered rows in one order.
      out["id_hash"] = tf.strings.to_hash_bucket_fast(features["id"], 2 ** 62)
    out["mask"] = tf.constant(True)
    return out

  ds = ds.map(pp, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(_padding({k: v for k, v in ds.element_spec.items() if k != "mask"}))
  ds = ds.take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
  return with_options(ds.prefetch(tf.data.AUTOTUNE), data_config)


def eval_batches(data_config, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Dict[str, np.ndarray]]:
  """One pass over the split in order, as full local batches.

  The last batches are padded with zero examples; `mask` (bool [b]) is True for
  real ones, so metrics must weight by it. Every process yields the same
  number of batches. `label` (int32) is kept when the task provides it, and `id_hash`
  (int64, a hash of the example's `id`) when it has ids.
  """
  return eval_dataset(data_config, global_batch_size=global_batch_size,
                      process_index=process_index,
                      process_count=process_count).as_numpy_iterator()
