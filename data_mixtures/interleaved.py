"""seqio tasks of the interleaved image-text kind (vlpjax.data.kinds.interleaved).

Registered on import, over the embedded stories (vlpjax.data.stories):
  stories_interleaved  text and images in reading order (prefix-LM contract, 64 px)
  stories_text         the same stories' texts only, images [0, S, S, 3]
  stories_mixed        mixture: 3 parts interleaved to 1 part text-only (VILA's finding:
                       text-only data in the mix keeps the LM's text ability)

`register_interleaved_tfrecord_task` registers a task over a user's own TFRecords in
the same layout (schema in the kind's module docstring and docs/data.md).
"""
import functools
from typing import Iterable, Mapping, Optional, Union

import seqio

from vlpjax.data import stories
from vlpjax.data.kinds import interleaved
from vlpjax.data import tasks
from vlpjax.data.tasks import add_task

STORIES_INTERLEAVED = "stories_interleaved"
STORIES_TEXT = "stories_text"
DEFAULT_IMAGE_SIZE = 64


def interleaved_preprocessors(image_size: int,
                              max_images: Optional[int] = interleaved.DEFAULT_MAX_IMAGES,
                              max_tokens: Optional[int] = None,
                              trailing_images: str = "drop", fixed_images: bool = False):
  """The preprocessors of an interleaved task: validate, tokenize (and pad images)."""
  steps = [interleaved.validate_document,
           functools.partial(interleaved.tokenize_document, image_size=image_size,
                             max_images=max_images, max_tokens=max_tokens,
                             trailing_images=trailing_images)]
  if fixed_images:
    if max_images is None:
      raise ValueError("fixed_images=True needs max_images (the number of image slots)")
    steps.append(functools.partial(interleaved.pad_images, max_images=max_images))
  return steps


def text_preprocessors(image_size: int, max_tokens: Optional[int] = None):
  """The preprocessors of a text-only task over interleaved records."""
  return [functools.partial(interleaved.tokenize_text, image_size=image_size,
                            max_tokens=max_tokens)]


def _stories_source(image_size: int, split_sizes: Optional[Mapping[str, int]]
                    ) -> seqio.FunctionDataSource:
  return tasks.generated_source(stories.make_dataset, split_sizes or stories.SPLIT_SIZES,
                                image_size=image_size)


def register_stories_interleaved_task(
    name: str = STORIES_INTERLEAVED, image_size: int = DEFAULT_IMAGE_SIZE,
    split_sizes: Optional[Mapping[str, int]] = None,
    max_images: Optional[int] = interleaved.DEFAULT_MAX_IMAGES,
    max_tokens: Optional[int] = None, trailing_images: str = "drop",
    fixed_images: bool = False) -> seqio.Task:
  """The stories as an interleaved task; small `split_sizes` suit tests.

  Images are rendered at `image_size`, which is also the task's image size.
  """
  return add_task(
      name, source=_stories_source(image_size, split_sizes),
      output_features=interleaved.output_features(fixed_images=fixed_images),
      preprocessors=interleaved_preprocessors(image_size, max_images, max_tokens,
                                              trailing_images, fixed_images))


def register_stories_text_task(name: str = STORIES_TEXT,
                               image_size: int = DEFAULT_IMAGE_SIZE,
                               split_sizes: Optional[Mapping[str, int]] = None,
                               max_tokens: Optional[int] = None) -> seqio.Task:
  """The stories' texts without their images, as a text-only task.

  `image_size` is the S of the empty images (and of the stories rendered, which the
  same-sized interleaved task then shares from the generator's cache).
  """
  return add_task(
      name, source=_stories_source(image_size, split_sizes),
      output_features=interleaved.output_features(),
      preprocessors=text_preprocessors(image_size, max_tokens))


def register_interleaved_tfrecord_task(
    name: str, file_pattern: Mapping[str, Union[str, Iterable[str]]],
    num_input_examples: Optional[Mapping[str, int]] = None, *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_images: Optional[int] = interleaved.DEFAULT_MAX_IMAGES,
    max_tokens: Optional[int] = None, trailing_images: str = "drop",
    text_only: bool = False, fixed_images: bool = False,
    vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
  """Interleaved TFRecords (split -> glob or list of globs) as a task named `name`.

  `text_only=True` reads the same files as a text-only task (images ignored).
  `vocabulary` must be a `vocab.MultimodalVocabulary` (default: the shipped one).
  """
  if text_only:
    steps = text_preprocessors(image_size, max_tokens)
  else:
    steps = interleaved_preprocessors(image_size, max_images, max_tokens,
                                      trailing_images, fixed_images)
  return add_task(
      name, source=interleaved.tfexample_source(file_pattern, num_input_examples),
      output_features=interleaved.output_features(
          vocabulary, fixed_images=fixed_images and not text_only),
      preprocessors=steps)


STORIES_MIXED = "stories_mixed"

register_stories_interleaved_task()
register_stories_text_task()
tasks.add_mixture(STORIES_MIXED, [(STORIES_INTERLEAVED, 3.0), (STORIES_TEXT, 1.0)])
