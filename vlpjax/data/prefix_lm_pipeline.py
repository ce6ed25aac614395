"""Packed prefix-LM batches from a mixture of data kinds: tasks -> mixture -> packing -> rows.

Each task yields examples in the prefix-LM contract of `vlpjax/data/kinds` (inputs, targets,
images); the pp string runs per task in tf.data (e.g. `value_range(-1, 1, key="images")`);
`mixing.MixedStream` picks tasks by rate; `packing.pack_iter` fills rows carrying their images.

Data config fields (beside task/split/pp/shuffle_buffer of `pipeline`):
  row_length          tokens per packed row
  max_images_per_row  image slots per row
  tokens_per_image    positions each image takes in the token stream
  image_size          S of the images [S, S, 3] after pp
  frame_feature_dim   optional; > 0: images are feature vectors [D], not [S, S, 3]
                      (video tasks registered with `frame_feature_dim=D`)
  task_loss_weights   optional {task name: weight >= 0}: the loss weight of that task's
                      target tokens (`decoder_loss_weights`); tasks not named weigh 1

Optional features pass through to the rows when a task yields them: `input_boxes`
(documents, as `decoder_boxes`) and `image_times` (videos: each frame's time in [0, 1]).

Resumption: the stream is a pure function of the seed (task order, shuffles, pp seeds, packing),
so resuming at batch k replays and drops the first k batches: exact, at the cost of re-reading
what was skipped (as `pipeline.train_batches` does).
"""
import itertools
import math
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from vlpjax import registry
from vlpjax.data import bad_records
from vlpjax.data import mixing
from vlpjax.data import packing
from vlpjax.data import pipeline
from vlpjax.data import preprocessors

_PP_SALT = 0x5EED
# Optional features carried into packing: per input token, per image.
_TOKEN_ALIGNED = ("input_boxes",)
_IMAGE_ALIGNED = (packing.TIMES_FEATURE,)


def image_token_id(task_name: str) -> int:
  """The `<image>` id of the task's `inputs` vocabulary."""
  vocab = seqio.get_mixture_or_task(task_name).output_features["inputs"].vocabulary
  return int(vocab.special_ids.image_id(0))


def image_shape(data_config) -> Tuple[int, ...]:
  """One image's shape in the rows: (S, S, 3), or (D,) with `frame_feature_dim` D > 0."""
  dim = int(data_config.get("frame_feature_dim", 0) or 0)
  if dim < 0:
    raise ValueError(f"input.frame_feature_dim must be >= 0, got {dim}")
  if dim:
    return (dim,)
  size = data_config.image_size
  return (size, size, 3)


def task_loss_weights(data_config, task_names: Sequence[str]) -> Dict[str, float]:
  """`data_config.task_loss_weights` checked against the mixture's tasks ({} if unset)."""
  weights = data_config.get("task_loss_weights", None) or {}
  if hasattr(weights, "to_dict"):
    weights = weights.to_dict()
  out = {}
  for name, weight in dict(weights).items():
    if name not in task_names:
      raise ValueError(f"input.task_loss_weights names a task that {data_config.task!r} "
                       "does not draw from: " +
                       registry.unknown_name_message("task", name, task_names))
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      weight = math.nan
    if not (math.isfinite(weight) and weight >= 0):
      raise ValueError(f"input.task_loss_weights[{name!r}] is {weights[name]!r}; a loss "
                       "weight is a finite number >= 0")
    out[name] = weight
  return out


def task_examples(data_config, task_name: str, seed: int, process_index: int,
                  process_count: int, skipped: bad_records.SkipCounter,
                  task_features: Optional[Dict[str, Dict[str, bool]]] = None,
                  shuffle: bool = True, num_epochs: Optional[int] = None
                  ) -> Iterator[Dict[str, np.ndarray]]:
  """Numpy examples of one task, host-sharded, pp applied: endless and shuffled for
  training, or one pass in order (`shuffle=False, num_epochs=1`) for evaluators.

  Records in `task_features[task_name]` which optional features the task yields.
  """
  ds = pipeline.task_dataset(data_config, task_name, shuffle=shuffle, seed=seed,
                             num_epochs=num_epochs, process_index=process_index,
                             process_count=process_count, skipped=skipped)
  if task_features is not None:
    task_features[task_name] = {k: True for k in ds.element_spec}
  chain = preprocessors.parse_pp(data_config.pp)
  base_seed = tf.constant([seed, _PP_SALT], tf.int64)
  no_images = tf.zeros((0,) + image_shape(data_config), tf.float32)

  def pp(position, features):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, position)
    features = chain(features, example_seed)
    images = features.get("images", no_images)
    out = {"inputs": tf.cast(features["inputs"], tf.int32),
           "targets": tf.cast(features["targets"], tf.int32),
           "images": tf.cast(images, tf.float32),
           "id": features.get("id", tf.constant(""))}
    # Optional features that packing carries (documents' layout, videos' frame times).
    out.update({k: tf.cast(features[k], tf.float32) for k in _TOKEN_ALIGNED + _IMAGE_ALIGNED
                if k in features})
    return out

  ds = ds.enumerate().map(pp, num_parallel_calls=tf.data.AUTOTUNE)
  # `input.threads` bounds tf.data's pool here too (as for image-text batches).
  return pipeline.with_options(ds.prefetch(tf.data.AUTOTUNE), data_config).as_numpy_iterator()


class PrefixLMBatches:
  """Endless local batches of packed rows.

  `counts` holds examples drawn per task, `skipped` the bad records dropped by reason
  (under input.bad_records='skip'). Examples of tasks in `input.task_loss_weights`
  carry that `loss_weight` into packing.
  """

  def __init__(self, data_config, *, global_batch_size: int, seed: int,
               start_position: int = 0, process_index: int = 0, process_count: int = 1):
    self.local_batch = pipeline.local_batch_size(global_batch_size, process_count)
    preprocessors.parse_pp(data_config.pp)  # Fail on typos before any work.
    mixture = mixing.members(data_config.task, pipeline.get_provider)
    self.loss_weights = task_loss_weights(data_config, [m.task for m in mixture])
    self.skipped = bad_records.SkipCounter()
    self._task_features: Dict[str, Dict[str, bool]] = {}
    self._stream = mixing.MixedStream(
        mixture, lambda name, task_seed: task_examples(
            data_config, name, task_seed, process_index, process_count, self.skipped,
            self._task_features), seed)
    image_ids = {image_token_id(m.task) for m in mixture}
    if len(image_ids) != 1:
      raise ValueError(f"tasks of {data_config.task!r} use different <image> ids {image_ids}: "
                       "their vocabularies must agree.")
    yields = lambda key: any(self._task_features[m.task].get(key, False) for m in mixture)
    rows = packing.pack_iter(
        self._weighted(self._stream), row_length=data_config.row_length,
        max_images_per_row=data_config.max_images_per_row,
        tokens_per_image=data_config.tokens_per_image,
        image_token_id=image_ids.pop(), image_shape=image_shape(data_config),
        # Every batch has the same keys: layout boxes (frame times) whenever any task
        # yields them.
        with_boxes=yields("input_boxes"), with_image_times=yields(packing.TIMES_FEATURE))
    self._batches = (packing.batch_rows(list(group)) for group in
                     _chunks(rows, self.local_batch))
    # Replaying is what makes resumption exact; see the module docstring.
    for _ in itertools.islice(self._batches, start_position):
      pass
    self.task_names = [m.task for m in mixture]
    self._counted = dict(self._stream.counts)

  def _weighted(self, stream) -> Iterator[Dict[str, np.ndarray]]:
    """The stream's examples, with `loss_weight` on those of weighted tasks."""
    for task, example in stream:
      if task in self.loss_weights:
        example = {**example, packing.LOSS_WEIGHT: self.loss_weights[task]}
      yield example

  @property
  def counts(self) -> Dict[str, int]:
    return dict(self._stream.counts)

  def task_counts(self, batch: Dict[str, np.ndarray]) -> Dict[str, int]:
    """Examples of each task drawn into packing since the previous call.

    Packing keeps a few rows open (first-fit), so the first call also counts the
    examples waiting in them; after that, what went into `batch` give or take the
    open rows' turnover.
    """
    del batch  # Packed rows mix tasks; the stream knows what it handed out.
    now = self.counts
    delta = {name: now.get(name, 0) - self._counted.get(name, 0) for name in self.task_names}
    self._counted = now
    return delta

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return next(self._batches)


def _chunks(iterator, size: int):
  while True:
    group = list(itertools.islice(iterator, size))
    if len(group) < size:
      return
    yield group
