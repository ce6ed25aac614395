"""Image-caption records in the prefix-LM contract: caption an image (PaliGemma's "caption").

Records are those of the image-caption kind (`vlpjax.data.sources`, docs/data.md): `image`
(encoded bytes), `caption` (one string, or several: `choose_caption` picks one first), `id`.
`to_prefix_lm` (after `preprocessors.decode_image`) gives the contract of
`vlpjax.data.kinds`:

  inputs   int32 [1 + n_prompt]   one `<image>` placeholder, then the optional prompt's tokens
  targets  int32 [n + 1]          the caption's tokens, then EOS
  images   uint8 [1, S, S, 3]     the image, resized to the task's S

and drops the record's other fields (`id` and `problem` stay). Bad records keep valid
shapes and carry a `problem` (`vlpjax.data.bad_records`): "missing image" / "corrupt image"
from decoding, "empty caption" here.

The image comes first, then the prompt: the decoder reads [BOS, image tokens, prompt]
bidirectionally and predicts the caption, which is what `VLMFamily.caption` prefills.
"""
import functools
from typing import Iterable, List, Mapping, Optional, Union

import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import kinds
from vlpjax.data import preprocessors
from vlpjax.data import sources
from vlpjax.data import tasks

# Fields the contract keeps besides its own: named in bad-record reports / the problem.
_KEPT = ("id", bad_records.PROBLEM_KEY)


def to_prefix_lm(ds: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                 image_size: int, prompt: str = "", max_tokens: Optional[int] = None,
                 key: str = "caption", image_key: str = "image") -> tf.data.Dataset:
  """seqio preprocessor: a decoded image-caption record -> inputs, targets, images.

  `max_tokens` caps the targets (EOS included; the caption is cut before EOS).
  The vocabulary is `output_features["inputs"]`'s (a `vocab.MultimodalVocabulary`).
  """
  if max_tokens is not None and max_tokens < 2:
    raise ValueError(f"max_tokens must be >= 2 or None (a token and EOS), got {max_tokens}")
  vocabulary = output_features["inputs"].vocabulary
  image_id = vocabulary.special_ids.image_id(0)
  eos_id = output_features["targets"].vocabulary.eos_id
  prompt_ids = [int(t) for t in vocabulary.encode(prompt)] if prompt else []
  if image_id in prompt_ids:
    raise ValueError(f"prompt {prompt!r} spells the image placeholder; the image comes "
                     "before the prompt on its own.")
  inputs = tf.constant([image_id] + prompt_ids, tf.int32)

  def fn(features):
    caption = features[key]
    tokens = tf.cast(vocabulary.encode_tf(caption), tf.int32)
    # A placeholder spelt in the caption would be an image without pixels: not a target.
    tokens = tf.boolean_mask(tokens, ~vocabulary.special_ids.is_image_id(tokens))
    if max_tokens is not None:
      tokens = tokens[:max_tokens - 1]
    image = preprocessors._resize(  # pylint: disable=protected-access  (uint8-exact resize)
        features[image_key], (image_size, image_size), "bilinear", True)
    out = {k: features[k] for k in _KEPT if k in features}
    out.update(inputs=inputs,
               targets=tf.concat([tokens, tf.constant([eos_id], tf.int32)], axis=0),
               images=tf.ensure_shape(image, [image_size, image_size, 3])[None])
    empty = tf.strings.length(tf.strings.strip(caption)) == 0
    return bad_records.add_problem(out, tf.where(empty, f"empty {key}", ""))

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def task_preprocessors(image_size: int, prompt: str = "", max_tokens: Optional[int] = None,
                       choose: bool = False) -> List:
  """[choose_caption (records with several captions)], decode_image, to_prefix_lm."""
  steps = [preprocessors.choose_caption] if choose else []
  return steps + [preprocessors.decode_image,
                  functools.partial(to_prefix_lm, image_size=image_size, prompt=prompt,
                                    max_tokens=max_tokens)]


def output_features(vocabulary: Optional[seqio.Vocabulary] = None):
  """The shared prefix-LM features (`kinds.output_features`)."""
  return kinds.output_features(vocabulary)


def tfexample_source(file_pattern: Mapping[str, Union[str, Iterable[str]]],
                     num_input_examples: Optional[Mapping[str, int]] = None
                     ) -> seqio.TFExampleDataSource:
  """Image-caption TFRecords (split -> glob or globs); the schema of docs/data.md."""
  return sources.image_caption_tfexample_source(file_pattern, num_input_examples)


def register_tfrecord_task(name: str, file_pattern: Mapping[str, Union[str, Iterable[str]]],
                           num_input_examples: Optional[Mapping[str, int]] = None, *,
                           image_size: int, prompt: str = "",
                           max_tokens: Optional[int] = None,
                           vocabulary: Optional[seqio.Vocabulary] = None) -> seqio.Task:
  """Image-caption TFRecords as a prefix-LM captioning task named `name`.

  Records may hold several captions; one is drawn per example and epoch.
  """
  return tasks.add_task(
      name, source=tfexample_source(file_pattern, num_input_examples),
      output_features=output_features(vocabulary),
      preprocessors=task_preprocessors(image_size, prompt, max_tokens, choose=True))
