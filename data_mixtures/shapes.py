"""seqio tasks over the embedded shapes data (vlpjax.data.shapes).

Registered on import:
  `shapes_captions`            records take the same path as a user's JPEG
                               tf.Examples (`vlpjax.data.tasks.register_image_caption_tfrecord_task`).
  `shapes_captions_cacheable`  the same examples, with a `seqio.CacheDatasetPlaceholder` so
                               that `vlpjax.data.cache.cache_tasks` can write it offline with
                               Apache Beam and training can read it with `use_cached=True`.

Both yield {id, caption, label, texts (int32 ids, no EOS), image (uint8 [S, S, 3]),
problem} (see `preprocessors.image_caption_output_features`).

  `shapes_captions_prefix_lm`  the same records as captioning in the prefix-LM contract
                               (`vlpjax.data.kinds.image_caption`): inputs [<image>],
                               targets = caption + EOS, images uint8 [1, S, S, 3].
"""
from typing import Mapping, Optional

import seqio

from vlpjax.data import preprocessors
from vlpjax.data import shapes
from vlpjax.data import tasks
from vlpjax.data.kinds import image_caption
from vlpjax.data.tasks import add_task

TASK_NAME = "shapes_captions"
CACHEABLE_TASK_NAME = "shapes_captions_cacheable"
PREFIX_LM_TASK_NAME = "shapes_captions_prefix_lm"


def _shapes_source(image_size: int,
                   split_sizes: Optional[Mapping[str, int]]) -> seqio.FunctionDataSource:
  return tasks.generated_source(shapes.make_dataset, split_sizes or shapes.SPLIT_SIZES,
                                image_size=image_size)


def register_shapes_task(name: str = TASK_NAME, image_size: int = 64,
                         split_sizes: Optional[Mapping[str, int]] = None) -> seqio.Task:
  """The generated shapes data as a task; small `split_sizes` suit tests."""
  return add_task(
      name, source=_shapes_source(image_size, split_sizes),
      output_features=preprocessors.image_caption_output_features(),
      preprocessors=[preprocessors.decode_image, preprocessors.tokenize_caption])


def register_cacheable_shapes_task(
    name: str = CACHEABLE_TASK_NAME, image_size: int = 64,
    split_sizes: Optional[Mapping[str, int]] = None) -> seqio.Task:
  """Like `register_shapes_task`, but can be cached offline (docs/cache.md).

  The cache holds what comes before the placeholder: the record (id, caption,
  label, the *encoded* JPEG bytes) plus its tokens and any `problem`. Images are
  decoded after the cache, on the fly, because
    * size: seqio stores a decoded image as an int64 list (varints: 2 bytes for
      a channel value >= 128), 10x the JPEG at 64 px (24 KB vs 2.3 KB) and 17x
      at 224 px (295 KB vs 18 KB); the cache, and the I/O of every epoch,
      would grow as much;
    * CPU: decoding a JPEG in TF's C++ is cheap next to what the cache saves
      (generating or reading the sources, filtering, tokenizing) and runs in
      tf.data threads alongside the training step;
    * seqio's cache reader parses features with `tf.io.parse_single_example`,
      which has no uint8: a cached uint8 image fails to read back, and its
      inner shape is frozen to that of the first example cached.
  Nothing random may come before the placeholder (the cache would freeze one
  draw for every epoch); random choices (e.g. `choose_caption`) go after it.
  A record with two problems reports its caption's first here, its image's in
  `shapes_captions`; the shapes data has none.
  """
  return add_task(
      name, source=_shapes_source(image_size, split_sizes),
      output_features=preprocessors.image_caption_output_features(),
      preprocessors=[preprocessors.tokenize_caption,
                     seqio.CacheDatasetPlaceholder(),
                     preprocessors.decode_image])


def register_shapes_prefix_lm_task(
    name: str = PREFIX_LM_TASK_NAME, image_size: int = 64,
    split_sizes: Optional[Mapping[str, int]] = None, prompt: str = "") -> seqio.Task:
  """The shapes as a prefix-LM captioning task (the VLM demo's training data).

  Rendered at `image_size` like `shapes_captions`, so a pp `resize(32, key="images")` gives
  the same pixels as that task's eval pp `resize(32)`.
  """
  return add_task(
      name, source=_shapes_source(image_size, split_sizes),
      output_features=image_caption.output_features(),
      preprocessors=image_caption.task_preprocessors(image_size, prompt))


register_shapes_task()
register_cacheable_shapes_task()
register_shapes_prefix_lm_task()
