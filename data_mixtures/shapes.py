"""seqio tasks over the embedded shapes data (vlpjax.data.shapes).

`shapes_captions` is registered on import; `register_tfrecord_task` registers the
same preprocessing over TFRecord files (the path a user's own data takes).
"""
import functools
from typing import Iterable, Mapping, Optional, Union

import seqio
import tensorflow as tf

from vlpjax.data import preprocessors
from vlpjax.data import shapes
from vlpjax.data import sources

TASK_NAME = "shapes_captions"


def add_task(name: str, **task_kwargs) -> seqio.Task:
  """TaskRegistry.add that replaces an existing task of the same name.

  Re-registering (a module reloaded, a test writing new files) then updates the
  task instead of failing with "already registered".
  """
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **task_kwargs)


def _shapes_dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None,
                       *, image_size: int, split_sizes: Mapping[str, int]) -> tf.data.Dataset:
  # Generated in index order whatever the seed; the task shuffles examples.
  del shuffle_files, seed
  return shapes.make_dataset(split, image_size, num_examples=split_sizes[split])


def register_shapes_task(name: str = TASK_NAME, image_size: int = 64,
                         split_sizes: Optional[Mapping[str, int]] = None) -> seqio.Task:
  """The generated shapes data as a task; small `split_sizes` suit tests."""
  split_sizes = dict(split_sizes or shapes.SPLIT_SIZES)
  source = seqio.FunctionDataSource(
      functools.partial(_shapes_dataset_fn, image_size=image_size,
                        split_sizes=split_sizes),
      splits=list(split_sizes), num_input_examples=split_sizes)
  return add_task(
      name, source=source, output_features=preprocessors.image_caption_output_features(),
      preprocessors=[preprocessors.decode_image, preprocessors.tokenize_caption])


def register_tfrecord_task(
    name: str, file_pattern: Mapping[str, Union[str, Iterable[str]]],
    num_input_examples: Optional[Mapping[str, int]] = None) -> seqio.Task:
  """Image-caption TFRecords (schema in docs/data.md) as a task named `name`."""
  return add_task(
      name,
      source=sources.image_caption_tfexample_source(file_pattern, num_input_examples),
      output_features=preprocessors.image_caption_output_features(),
      preprocessors=[preprocessors.choose_caption, preprocessors.decode_image,
                     preprocessors.tokenize_caption])


register_shapes_task()
