"""Helpers for registering seqio tasks of each data kind (used by `data_mixtures/`)."""
from typing import Iterable, Mapping, Optional, Union

import seqio

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
