"""Helpers for registering seqio tasks of each data kind (used by `data_mixtures/`)."""
import functools
from typing import Callable, Iterable, Mapping, Optional, Union

import seqio
import tensorflow as tf

from vlpjax.data import preprocessors
from vlpjax.data import sources


def add_task(name: str, **task_kwargs) -> seqio.Task:
  """TaskRegistry.add that replaces an existing task of the same name.

  Re-registering (a module reloaded, a test writing new files) then updates the
  task instead of failing with "already registered".
  """
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **task_kwargs)


def add_mixture(name: str, tasks, default_rate: float = 1.0) -> seqio.Mixture:
  """MixtureRegistry.add that replaces an existing mixture (as `add_task` does)."""
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


def _generated_split(split: str, shuffle_files: bool, seed: Optional[int] = None, *,
                     make_dataset: Callable[..., tf.data.Dataset],
                     split_sizes: Mapping[str, int], make_kwargs: Mapping[str, object]
                     ) -> tf.data.Dataset:
  # Generated in index order whatever the seed; the task shuffles examples.
  # (`make_kwargs` is one argument: seqio rejects dataset functions with **kwargs.)
  del shuffle_files, seed
  return make_dataset(split, num_examples=split_sizes[split], **make_kwargs)


def generated_source(make_dataset: Callable[..., tf.data.Dataset],
                     split_sizes: Mapping[str, int], **make_kwargs) -> seqio.FunctionDataSource:
  """An embedded generator as a seqio source.

  Split s holds `make_dataset(s, num_examples=split_sizes[s], **make_kwargs)`;
  the generators (`shapes`, `stories`, `videos`, `documents`) all take that form.
  """
  split_sizes = dict(split_sizes)
  return seqio.FunctionDataSource(
      functools.partial(_generated_split, make_dataset=make_dataset, split_sizes=split_sizes,
                        make_kwargs=make_kwargs),
      splits=list(split_sizes), num_input_examples=split_sizes)


def register_image_caption_tfrecord_task(
    name: str, file_pattern: Mapping[str, Union[str, Iterable[str]]],
    num_input_examples: Optional[Mapping[str, int]] = None) -> seqio.Task:
  """Image-caption TFRecords (schema in docs/data.md) as a task named `name`."""
  return add_task(
      name,
      source=sources.image_caption_tfexample_source(file_pattern, num_input_examples),
      output_features=preprocessors.image_caption_output_features(),
      preprocessors=[preprocessors.choose_caption, preprocessors.decode_image,
                     preprocessors.tokenize_caption])
