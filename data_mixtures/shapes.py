"""seqio tasks over the embedded shapes data (vlpjax.data.shapes).

`shapes_captions` is registered on import. Its records take the same path as a user's
JPEG tf.Examples (`vlpjax.data.tasks.register_image_caption_tfrecord_task`).
"""
import functools
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from vlpjax.data import preprocessors
from vlpjax.data import shapes
from vlpjax.data.tasks import add_task

TASK_NAME = "shapes_captions"


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


register_shapes_task()
