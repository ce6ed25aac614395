"""The interleaved image-text (OBELICS-style) data kind: sources, checks, token streams.

A document is a sequence of positions, each holding a text or an image, in reading
order. The record (`vlpjax.data.stories` writes it; a user's TFRecords use the same
`tf.train.Example` layout, parsed by `feature_description`):

  id            string        named in every bad-record report; default ""
  texts         string [n]    the text of a text position, "" at image positions
  images        string [n]    encoded image (JPEG/PNG best) at an image position, b"" at texts
  image_labels  int64 [n]     optional per-position metadata (e.g. a class index at images,
                              -1 at texts); may be absent

Exactly one of texts[i] and images[i] is non-empty. Lists are parsed as ragged
features, so a record that lacks `texts` or `images` still parses (to an empty list)
and is reported as a bad record instead of failing the pipeline.

Bad records (`validate_document`; reasons before ':' are the metric keys of
`vlpjax.data.bad_records`), first failing check wins:
  "missing texts" / "missing images"   one list absent or empty, the other not
  "empty document"                     no positions at all
  "unequal lists"                      texts, images (and image_labels, when present)
                                       differ in length
  "both text and image" / "neither text nor image"   at some position
  "no image"   (interleaved tasks) a document with text only: it belongs in a
               text-only task (`tokenize_text`), which can read the same files, so
               that mixture rates say how much image data a run sees
  "no text"    nothing to predict
`tokenize_document` adds "image token in text" (a text spells the `<image>`
placeholder, which would be a placeholder without an image; it is removed) and
"corrupt image" (an image that does not decode). Bad records keep valid shapes.

Interleaved task output (`tokenize_document`), the prefix-LM contract of
`vlpjax.data.kinds`:
  inputs        int32 [n_in]          the stream up to and including its last image
                                      placeholder; each image is ONE `<image>` id
  targets       int32 [n_tgt]         the text after the last image, then EOS
  images        uint8 [k, S, S, 3]    decoded, resized to S; the k-th is the image of the
                                      k-th placeholder, and k == placeholders in `inputs`
  image_labels  int64 [k]             the kept images' labels (-1 without metadata)
Each position is tokenized on its own (each text starts a new SentencePiece word).

Why this split: `vlpjax.data.packing` puts loss on `targets` only, and targets may not
hold image tokens (a placeholder is where image embeddings go, not something to
predict). So every image must sit in the prefix, and the prefix ends at the last
image. The text before it is read bidirectionally with the images and gets no loss;
the text after it is predicted, conditioned on everything before: "continue the
document". A document ending in an image would leave only EOS to predict, so by
default (`trailing_images="drop"`) images after the last text are dropped, and the
last text run becomes the target (a "t i t i" story trains on its last "t", with
three images in the prefix). `trailing_images="keep"` keeps them.

Truncation keeps the head of the document, consistently, in this order:
  1. `max_images`: the stream up to just before the (max_images+1)-th image, so the
     text between the max_images-th image and the next one is kept;
  2. `max_tokens`: the first `max_tokens - 1` tokens of that stream (EOS takes the
     last place; text may be cut mid-word, and a placeholder is one token);
  3. trailing images dropped (rule above);
  4. the split: inputs = up to the last placeholder, targets = the rest + EOS.
The k kept placeholders are the stream's first k images, so the images kept are the
document's first k; images that are dropped are not decoded (nor checked).

Fixed-size variant for consumers that do not pack (`pad_images`): `images` padded with
zeros to uint8 [max_images, S, S, 3], plus `image_mask` bool [max_images]. Packing needs
the unpadded form (one image per placeholder).

Text-only tasks (`tokenize_text`): the non-empty texts of a record, concatenated; the
images are ignored. Output `inputs` int32 [0], `targets` = the text + EOS (plain
next-token prediction), `images` uint8 [0, S, S, 3], so a text-only task mixes with image
tasks (packing gives it no image slots). `text_as_document` turns a plain-text record
{"text": string} into {"texts": [text]} for it.
"""
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import sources
from vlpjax.data import kinds
from vlpjax.data import preprocessors

Features = Dict[str, tf.Tensor]
NO_LABEL = -1
TRAILING_IMAGES = ("drop", "keep")
DEFAULT_MAX_IMAGES = 8
# Keys the interleaved preprocessors read; they are replaced by the task's output.
_RECORD_LISTS = ("texts", "images", "image_labels")

# --------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------


def feature_description() -> Dict[str, object]:
  """How an interleaved tf.train.Example is parsed; lists come back at their own length.

  Ragged features parse an absent list as an empty one, so a record missing `texts` or
  `images` becomes a bad record ("missing ...") rather than a parse error.
  """
  return {
      "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "texts": tf.io.RaggedFeature(tf.string),
      "images": tf.io.RaggedFeature(tf.string),
      "image_labels": tf.io.RaggedFeature(tf.int64),
  }


def tfexample_source(file_pattern: Mapping[str, Union[str, Iterable[str]]],
                     num_input_examples: Optional[Mapping[str, int]] = None
                     ) -> seqio.TFExampleDataSource:
  """TFRecords of interleaved tf.train.Examples (split -> glob or list of globs)."""
  return sources.tfexample_source(file_pattern, feature_description(), num_input_examples)


# Nothing kind-specific: rekey the dataset's features to the record names above
# (`id`, `texts`, `images`, optionally `image_labels`) before `validate_document`.
tfds_source = sources.tfds_source


# --------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------


def _as_list(value, dtype: tf.DType) -> tf.Tensor:
  """A parsed list (Tensor, RaggedTensor, SparseTensor, or absent) as a 1-D Tensor."""
  if value is None:
    return tf.zeros([0], dtype)
  if isinstance(value, tf.RaggedTensor):
    value = value.flat_values
  elif isinstance(value, tf.SparseTensor):
    value = value.values
  return tf.reshape(tf.cast(value, dtype), [-1])


def _record_lists(features: Features) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  return (_as_list(features.get("texts"), tf.string),
          _as_list(features.get("images"), tf.string),
          _as_list(features.get("image_labels"), tf.int64))


def _lengths_ok(texts: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
  return tf.logical_and(tf.size(texts) == tf.size(images), tf.size(texts) > 0)


def _safe_lists(features: Features) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The record's (texts, images, labels), or a one-position blank when unusable.

  Elementwise work on lists of unequal (or zero) length would fail in TF; such a
  record already has its problem, and the blank keeps every shape valid.
  """
  texts, images, labels = _record_lists(features)
  texts, images = tf.cond(_lengths_ok(texts, images), lambda: (texts, images),
                          lambda: (tf.constant([""]), tf.constant([""])))
  labels = tf.cond(tf.size(labels) == tf.size(texts), lambda: labels,
                   lambda: tf.fill([tf.size(texts)], tf.constant(NO_LABEL, tf.int64)))
  return texts, images, labels


def _str(x: tf.Tensor) -> tf.Tensor:
  return tf.strings.as_string(x)


def _first(mask: tf.Tensor) -> tf.Tensor:
  """Index of the first True of a 1-D bool tensor (its size when none)."""
  # The appended True keeps argmax defined on empty tensors.
  return tf.argmax(tf.cast(tf.concat([mask, [True]], 0), tf.int32), output_type=tf.int32)


def document_checks(features: Features, require_image: bool = True,
                    require_text: bool = True) -> List[Tuple[tf.Tensor, object]]:
  """(ok, reason) pairs for `bad_records.first_problem`, in the module docstring's order."""
  texts, images, labels = _record_lists(features)
  n_t, n_i, n_l = tf.size(texts), tf.size(images), tf.size(labels)
  checks = [
      (tf.logical_not((n_t == 0) & (n_i > 0)), tf.strings.join([
          "missing texts: field absent or empty, images has ", _str(n_i), " values"])),
      (tf.logical_not((n_i == 0) & (n_t > 0)), tf.strings.join([
          "missing images: field absent or empty, texts has ", _str(n_t), " values"])),
      (n_t > 0, "empty document: no texts and no images"),
      ((n_t == n_i) & ((n_l == 0) | (n_l == n_t)), tf.strings.join([
          "unequal lists: texts ", _str(n_t), ", images ", _str(n_i),
          ", image_labels ", _str(n_l)])),
  ]
  texts, images, _ = _safe_lists(features)
  has_text = tf.strings.length(texts) > 0
  has_image = tf.strings.length(images) > 0
  both, neither = has_text & has_image, ~has_text & ~has_image
  checks += [
      (~tf.reduce_any(both), tf.strings.join(["both text and image: position ",
                                              _str(_first(both))])),
      (~tf.reduce_any(neither), tf.strings.join(["neither text nor image: position ",
                                                 _str(_first(neither))])),
  ]
  if require_image:
    checks.append((tf.reduce_any(has_image),
                   "no image: text-only documents belong in a text-only task"))
  if require_text:
    checks.append((tf.reduce_any(has_text), "no text: nothing to predict"))
  return checks


def validate_document(ds: tf.data.Dataset, require_image: bool = True,
                      require_text: bool = True) -> tf.data.Dataset:
  """seqio preprocessor: sets `problem` on records that break the schema (never raises)."""
  return bad_records.check(ds, lambda f: document_checks(f, require_image, require_text))


# --------------------------------------------------------------------------------
# The token stream
# --------------------------------------------------------------------------------


def _text_tokens(texts: tf.Tensor, vocabulary) -> Tuple[tf.RaggedTensor, tf.Tensor]:
  """(ids per text [n, None] without image ids, where a text held an image id [n])."""
  rows = tf.cast(vocabulary.encode_tf(texts), tf.int32)
  is_image_id = vocabulary.special_ids.is_image_id(rows)
  # A placeholder spelt in text has no image; keeping it would break the pairing.
  return tf.ragged.boolean_mask(rows, ~is_image_id), tf.reduce_any(is_image_id, axis=1)


def _position_tokens(texts: tf.Tensor, is_image: tf.Tensor, vocabulary
                     ) -> Tuple[tf.Tensor, tf.Tensor]:
  """(the document's token stream [T], bool [n] texts that spelt an image token).

  A text position gives its text's ids; an image position gives one `<image>` id.
  """
  text_rows, spelt = _text_tokens(texts, vocabulary)
  image_id = vocabulary.special_ids.image_id(0)
  count = tf.reduce_sum(tf.cast(is_image, tf.int32))
  image_rows = tf.RaggedTensor.from_row_lengths(
      tf.fill([count], tf.constant(image_id, tf.int32)), tf.cast(is_image, tf.int64))
  return tf.concat([text_rows, image_rows], axis=1).flat_values, spelt


def _end_after_last(mask: tf.Tensor) -> tf.Tensor:
  """1 + the index of the last True of a 1-D bool tensor; 0 when none."""
  index = tf.range(1, tf.size(mask) + 1)
  return tf.reduce_max(tf.concat([tf.where(mask, index, 0), [0]], axis=0))


def split_stream(stream: tf.Tensor, *, image_id: int, eos_id: int,
                 max_images: Optional[int] = None, max_tokens: Optional[int] = None,
                 trailing_images: str = "drop") -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Truncates a token stream and splits it: (inputs, targets + EOS, kept image count).

  Steps 1-4 of the module docstring; works on any int32 [T] stream where `image_id`
  marks the images.
  """
  is_image = tf.equal(stream, image_id)
  end = tf.size(stream)
  if max_images is not None:
    # Images seen up to each token (inclusive): the (max_images+1)-th image and all
    # after it have more; everything before it, text included, is kept.
    seen = tf.cumsum(tf.cast(is_image, tf.int32))
    end = tf.reduce_sum(tf.cast(seen <= max_images, tf.int32))
  if max_tokens is not None:
    end = tf.minimum(end, max_tokens - 1)  # The last place is EOS's.
  stream, is_image = stream[:end], is_image[:end]
  if trailing_images == "drop":
    end = _end_after_last(~is_image)
    stream, is_image = stream[:end], is_image[:end]
  split = _end_after_last(is_image)
  targets = tf.concat([stream[split:], tf.constant([eos_id], tf.int32)], axis=0)
  return stream[:split], targets, tf.reduce_sum(tf.cast(is_image, tf.int32))


# --------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------


def _decode_one(data: tf.Tensor, size: int) -> Tuple[tf.Tensor, tf.Tensor]:
  image, problem = preprocessors.decode_image_bytes(data)
  # pylint: disable=protected-access  (the resize that keeps uint8 values exact)
  image = preprocessors._resize(image, (size, size), "bilinear", True)
  return tf.ensure_shape(image, [size, size, 3]), problem


def decode_images(data: tf.Tensor, positions: tf.Tensor, size: int
                  ) -> Tuple[tf.Tensor, tf.Tensor]:
  """Encoded images [k] -> (uint8 [k, size, size, 3], problem naming the first bad one).

  `positions` [k] are the images' positions in the record, for the message.
  """
  images, problems = tf.map_fn(
      lambda x: _decode_one(x, size), data,
      fn_output_signature=(tf.TensorSpec([size, size, 3], tf.uint8),
                           tf.TensorSpec([], tf.string)))
  bad = tf.strings.length(problems) > 0
  k = _first(bad)
  # Padded by one so that indexing is valid when there are no images.
  detail = tf.concat([problems, [""]], 0)[k]
  where = tf.concat([tf.cast(positions, tf.int32), [0]], 0)[k]
  problem = tf.strings.join([
      "corrupt image: image ", _str(k), " (position ", _str(where), "): ",
      tf.strings.regex_replace(detail, "^corrupt image: ", "")])
  return images, tf.where(tf.reduce_any(bad), problem, "")


# --------------------------------------------------------------------------------
# seqio preprocessors
# --------------------------------------------------------------------------------


def _check_caps(max_images: Optional[int], max_tokens: Optional[int]):
  if max_images is not None and max_images < 1:
    raise ValueError(f"max_images must be >= 1 or None, got {max_images} "
                     "(a task without images is a text-only task: tokenize_text)")
  if max_tokens is not None and max_tokens < 2:
    raise ValueError(f"max_tokens must be >= 2 or None (one text token and EOS), "
                     f"got {max_tokens}")


def _spelt_problem(spelt: tf.Tensor) -> tf.Tensor:
  return tf.where(tf.reduce_any(spelt), tf.strings.join([
      "image token in text: position ", _str(_first(spelt)), " (removed)"]), "")


def _without_record_lists(features: Features) -> Features:
  return {k: v for k, v in features.items() if k not in _RECORD_LISTS}


def tokenize_document(ds: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                      image_size: int, max_images: Optional[int] = DEFAULT_MAX_IMAGES,
                      max_tokens: Optional[int] = None,
                      trailing_images: str = "drop") -> tf.data.Dataset:
  """seqio preprocessor: an interleaved record -> inputs, targets, images, image_labels.

  Rules in the module docstring. The vocabulary is that of `output_features["inputs"]`
  (a `vocab.MultimodalVocabulary`). Run `validate_document` first: a bad record then
  carries its problem, and here it only needs to keep valid shapes. `texts`, `images`
  and `image_labels` are replaced by the outputs; other features (`id`, `problem`)
  pass through.
  """
  _check_caps(max_images, max_tokens)
  if trailing_images not in TRAILING_IMAGES:
    raise ValueError(f"trailing_images must be one of {TRAILING_IMAGES}, "
                     f"got {trailing_images!r}")
  vocabulary = output_features["inputs"].vocabulary
  image_id = vocabulary.special_ids.image_id(0)
  eos_id = output_features["targets"].vocabulary.eos_id

  def fn(features):
    texts, images, labels = _safe_lists(features)
    is_image = tf.strings.length(images) > 0
    stream, spelt = _position_tokens(texts, is_image, vocabulary)
    inputs, targets, count = split_stream(
        stream, image_id=image_id, eos_id=eos_id, max_images=max_images,
        max_tokens=max_tokens, trailing_images=trailing_images)
    # Placeholders follow image positions in order, so the first `count` are kept.
    positions = tf.where(is_image)[:count, 0]
    pictures, decode_problem = decode_images(tf.gather(images, positions), positions,
                                             image_size)
    out = {**_without_record_lists(features), "inputs": inputs, "targets": targets,
           "images": pictures, "image_labels": tf.gather(labels, positions)}
    out = bad_records.add_problem(out, _spelt_problem(spelt))
    return bad_records.add_problem(out, decode_problem)

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def text_as_document(ds: tf.data.Dataset, key: str = "text") -> tf.data.Dataset:
  """seqio preprocessor: a plain-text record's string `key` -> `texts` [1]."""

  def fn(features):
    text = tf.reshape(features[key], [1])
    return {**{k: v for k, v in features.items() if k != key}, "texts": text}

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def tokenize_text(ds: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                  image_size: int, max_tokens: Optional[int] = None) -> tf.data.Dataset:
  """seqio preprocessor for text-only tasks: inputs [0], targets = texts + EOS, no images.

  Reads the record's non-empty `texts` in order (an interleaved record's images are
  ignored, not decoded). A record without text gets the problem "no text".
  """
  _check_caps(None, max_tokens)
  vocabulary = output_features["targets"].vocabulary
  eos_id = vocabulary.eos_id

  def fn(features):
    texts = _as_list(features.get("texts"), tf.string)
    texts = tf.boolean_mask(texts, tf.strings.length(texts) > 0)
    rows, spelt = _text_tokens(texts, vocabulary)
    stream = rows.flat_values
    if max_tokens is not None:
      stream = stream[:max_tokens - 1]
    out = {**_without_record_lists(features), "inputs": tf.zeros([0], tf.int32),
           "targets": tf.concat([stream, tf.constant([eos_id], tf.int32)], 0),
           "images": tf.zeros([0, image_size, image_size, 3], tf.uint8)}
    out = bad_records.add_problem(
        out, tf.where(tf.size(texts) > 0, "", "no text: nothing to predict"))
    return bad_records.add_problem(out, _spelt_problem(spelt))

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def pad_images(ds: tf.data.Dataset, max_images: int) -> tf.data.Dataset:
  """seqio preprocessor: `images` -> uint8 [max_images, S, S, 3] + `image_mask` [max_images].

  For consumers that want fixed shapes instead of packing. Empty slots are zeros
  (labels -1) with mask False. A record with more images (a task without the same
  `max_images` cap) gets the problem "too many images" and keeps its first ones.
  """
  _check_caps(max_images, None)

  def fn(features):
    images = features["images"]
    n = tf.shape(images)[0]
    pad = tf.maximum(max_images - n, 0)
    out = {**features,
           "images": tf.pad(images[:max_images], [[0, pad], [0, 0], [0, 0], [0, 0]]),
           "image_mask": tf.range(max_images) < n}
    if "image_labels" in features:
      out["image_labels"] = tf.pad(features["image_labels"][:max_images], [[0, pad]],
                                   constant_values=NO_LABEL)
    return bad_records.add_problem(out, tf.where(n <= max_images, "", tf.strings.join([
        "too many images: ", _str(n), " > max_images ", str(max_images)])))

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def output_features(vocabulary: Optional[seqio.Vocabulary] = None,
                    fixed_images: bool = False) -> Dict[str, seqio.Feature]:
  """The shared prefix-LM features (`kinds.output_features`).

  `image_mask` is optional there; tasks that end with `pad_images` yield it.
  `fixed_images` is accepted for symmetry with the task helpers.
  """
  del fixed_images
  return kinds.output_features(vocabulary)
