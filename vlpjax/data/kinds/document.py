"""The document-layout (UDOP-style) data kind: sources, validation, page, layout.

The record (`vlpjax.data.documents` writes it; a user's TFRecords use the same
`tf.train.Example` layout, parsed by `feature_description`):

  id        string          named in every problem; default ""
  image     string          the encoded page (PNG or JPEG best); default "" so
                            that a record without one is reported, not fatal
  width, height  int64      page size in pixels; needed for pixel boxes only
  words     string [N]      OCR words in reading order
  boxes     float32 [4 * N] flat, word i is boxes[4i:4i+4] = (x0, y0, x1, y1),
                            in pixels of the page, or normalised to [0, 1]
                            when the source/task says `normalized_boxes=True`
  question, answer  string  for document QA; default ""

Boxes. Pixel boxes are divided by the page size; normalised boxes are used as
they are. A valid box has 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
(1 for normalised boxes): zero-width boxes are refused because they cannot be
located. `box_fractions` gives the normalised box of every word in float64.

Layout tokens. A box is four `<loc_k>` tokens x0 y0 x1 y1, each coordinate
quantised over the page as `special_tokens.box_to_loc_bins` does (K bins,
0 -> bin 0, the far edge -> bin K-1, nearest bin, halves up). `loc_bins` is
its TF twin; it computes in float64 with the same operations in the same
order, so both give identical bins, also at exact halves.

The page. `decode_page` decodes the image and resizes it to S x S, ignoring
its aspect ratio (a stretch). Boxes are relative to the page, so a stretch
leaves their normalised coordinates and loc tokens unchanged; a model that
cares about the aspect ratio can read it from `width` / `height`.

Bad records (see `vlpjax.data.bad_records`): `validate` and `decode_page`
never raise; they set `problem`, first reason wins:
  "missing image: ..."          the `image` field is empty or absent
  "bad page size: ..."          pixel boxes on a page without width/height
  "empty words: ..."            no OCR words
  "boxes length mismatch: ..."  len(boxes) != 4 * len(words)
  "box out of range: ..."       names the word index, the word and the box
  "corrupt image: ..."          the page does not decode
and keep the shapes valid (boxes zeroed or clipped, a blank page), so the
rest of the task runs on such a record harmlessly.

After `validate` + `decode_page` a record holds
  id string, words string [N], word_boxes float64 [N, 4] (normalised, clipped),
  images uint8 [1, S, S, 3], question / answer strings, problem string;
`document_objectives` turns that into prefix-LM examples
  inputs int32 [n_in], targets int32 [n_tgt] (ending in EOS),
  images uint8 [1, S, S, 3], input_boxes float32 [n_in, 4]
(`output_features` declares them).
"""
from typing import Dict, Iterable, Mapping, Optional, Union

import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import sources
from vlpjax.data import kinds
from vlpjax.data import preprocessors

Features = Dict[str, tf.Tensor]
DEFAULT_NUM_LOC_BINS = 500

# --------------------------------------------------------------------------------
# Sources and output features
# --------------------------------------------------------------------------------


def feature_description(normalized: bool = False) -> Dict[str, object]:
  """How a document tf.train.Example is parsed; lists come back at their own length.

  Every field has a default, so a record that lacks one is parsed and then
  reported by `validate` instead of stopping the run. Normalised boxes need no
  page size, so `width` / `height` are only read for pixel boxes.
  """
  description = {
      "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "words": tf.io.RaggedFeature(tf.string),
      "boxes": tf.io.RaggedFeature(tf.float32),
      "question": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "answer": tf.io.FixedLenFeature([], tf.string, default_value=""),
  }
  if not normalized:
    description["width"] = tf.io.FixedLenFeature([], tf.int64, default_value=0)
    description["height"] = tf.io.FixedLenFeature([], tf.int64, default_value=0)
  return description


def tfexample_source(file_pattern: Mapping[str, Union[str, Iterable[str]]],
                     num_input_examples: Optional[Mapping[str, int]] = None,
                     normalized: bool = False) -> seqio.TFExampleDataSource:
  """TFRecords of document tf.train.Examples (split -> glob or list of globs)."""
  return sources.tfexample_source(file_pattern, feature_description(normalized),
                                  num_input_examples)


# Nothing kind-specific: rekey the dataset's features to the record names above first.
tfds_source = sources.tfds_source


def output_features(vocabulary: Optional[seqio.Vocabulary] = None
                    ) -> Dict[str, seqio.Feature]:
  """The shared prefix-LM features (`kinds.output_features`), `input_boxes` among them.

  The objectives write `<image>`, `<loc_k>` and `<extra_id_k>` by id, so the
  vocabulary must have the structure tokens (`vocab.MultimodalVocabulary`).
  """
  return kinds.output_features(vocabulary)


# --------------------------------------------------------------------------------
# Boxes and loc bins
# --------------------------------------------------------------------------------


def dense(x) -> tf.Tensor:
  """A parsed list (Tensor, RaggedTensor, SparseTensor) as a 1-D Tensor."""
  if isinstance(x, tf.RaggedTensor):
    return x.to_tensor()
  if isinstance(x, tf.SparseTensor):
    return tf.sparse.to_dense(x)
  return x


def _page_limits(width, height) -> tf.Tensor:
  """float64 [4]: the limit of x0, y0, x1, y1 (1 for normalised boxes)."""
  if width is None:
    return tf.ones([4], tf.float64)
  w, h = tf.cast(width, tf.float64), tf.cast(height, tf.float64)
  return tf.stack([w, h, w, h])


def box_fractions(boxes: tf.Tensor, width=None, height=None) -> tf.Tensor:
  """float64 [..., 4] boxes in [0, 1]: pixel boxes / page size, clipped.

  `width` / `height` None means the boxes are normalised already. NaN becomes 0
  (only bad records, already reported, have one). Clip, then divide, in
  float64: exactly what `special_tokens.box_to_loc_bins(clip=True)` computes.
  """
  limits = _page_limits(width, height)
  limits = tf.where(limits > 0, limits, tf.ones_like(limits))  # Bad sizes are reported.
  boxes = tf.cast(boxes, tf.float64)
  boxes = tf.where(tf.math.is_nan(boxes), tf.zeros_like(boxes), boxes)
  return tf.clip_by_value(boxes, 0.0, limits) / limits


def quantise(fractions: tf.Tensor, num_bins: int = DEFAULT_NUM_LOC_BINS) -> tf.Tensor:
  """int32 bins of float64 fractions: floor(f * (K - 1) + 0.5), clamped to [0, K-1]."""
  if num_bins < 2:
    raise ValueError(f"num_bins must be >= 2, got {num_bins}")
  scaled = tf.cast(fractions, tf.float64) * float(num_bins - 1)
  bins = tf.clip_by_value(tf.floor(scaled + 0.5), 0.0, float(num_bins - 1))
  return tf.cast(bins, tf.int32)


def loc_bins(boxes: tf.Tensor, width=None, height=None,
             num_bins: int = DEFAULT_NUM_LOC_BINS) -> tf.Tensor:
  """int32 [..., 4]: `special_tokens.box_to_loc_bins(box, width, height, num_bins,
  clip=True)` of every box, in TF (pixel boxes with width/height, else normalised)."""
  return quantise(box_fractions(boxes, width, height), num_bins)


# --------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------


def _num(x) -> tf.Tensor:
  return tf.strings.as_string(x, shortest=True) if x.dtype.is_floating else \
      tf.strings.as_string(x)


def _box_problem(words: tf.Tensor, boxes: tf.Tensor, width, height) -> tf.Tensor:
  """The reason for the first word whose box is off the page or empty ("" if none)."""
  limits = _page_limits(width, height)
  b = tf.cast(boxes, tf.float64)
  x0, y0, x1, y1 = tf.unstack(b, num=4, axis=-1)
  # Written so that NaN fails: every comparison with NaN is False.
  ok = ((x0 >= 0) & (x0 < x1) & (x1 <= limits[2]) &
        (y0 >= 0) & (y0 < y1) & (y1 <= limits[3]))
  if width is None:
    page = "in normalised [0, 1] coordinates"
  else:
    page = tf.strings.join(["on a ", _num(width), "x", _num(height), " page"])

  def reason():
    i = tf.argmin(tf.cast(ok, tf.int32), output_type=tf.int32)  # The first bad word.
    coords = tf.strings.reduce_join(_num(boxes[i]), separator=", ")
    return tf.strings.join([
        "box out of range: word ", _num(i), " '", words[i], "' box (x0, y0, x1, y1) = (",
        coords, ") ", page, "; need 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height"])

  return tf.cond(tf.reduce_all(ok), lambda: tf.constant(""), reason)


def _size_of(features: Features, normalized: bool):
  if normalized:
    return None, None
  return features.get("width", tf.constant(0, tf.int64)), \
      features.get("height", tf.constant(0, tf.int64))


def _record_problem(features: Features, normalized: bool) -> tf.Tensor:
  """The first reason in the module docstring's order that applies ("" if none)."""
  words, flat = dense(features["words"]), dense(features["boxes"])
  n, n_values = tf.size(words), tf.size(flat)
  width, height = _size_of(features, normalized)
  sized = tf.constant(True) if normalized else (width > 0) & (height > 0)
  matched = tf.equal(n_values, 4 * n)
  checks = [
      (tf.strings.length(features.get("image", tf.constant(""))) > 0,
       "missing image: the 'image' field is empty or absent"),
      (sized, tf.strings.join(["bad page size: width ", _num(width), ", height ",
                               _num(height), "; pixel boxes need both > 0"])
       if not normalized else ""),
      (n > 0, "empty words: the page has no OCR words"),
      (matched, tf.strings.join([
          "boxes length mismatch: ", _num(n), " words need ", _num(4 * n),
          " values in 'boxes' (x0, y0, x1, y1 each), got ", _num(n_values)])),
  ]
  # Boxes are read only when their count and the page size are right.
  box_problem = tf.cond(sized & matched,
                        lambda: _box_problem(words, tf.reshape(flat, [-1, 4]), width,
                                             height),
                        lambda: tf.constant(""))
  checks.append((tf.equal(box_problem, ""), box_problem))
  return bad_records.first_problem(checks)


def _word_boxes(features: Features, normalized: bool) -> tf.Tensor:
  """float64 [N, 4] normalised boxes; zeros where the record's boxes do not fit."""
  words, flat = dense(features["words"]), dense(features["boxes"])
  n = tf.size(words)
  boxes = tf.cond(tf.equal(tf.size(flat), 4 * n), lambda: tf.reshape(flat, [-1, 4]),
                  lambda: tf.zeros([n, 4], flat.dtype))
  width, height = _size_of(features, normalized)
  return tf.ensure_shape(box_fractions(boxes, width, height), [None, 4])


def validate(ds: tf.data.Dataset, normalized_boxes: bool = False) -> tf.data.Dataset:
  """Checks each record, sets `problem`, and replaces `boxes` by `word_boxes`.

  `word_boxes` is float64 [N, 4] in [0, 1] (module docstring), safe to use
  even on a bad record. Never raises.
  """

  def fn(features):
    problem = _record_problem(features, normalized_boxes)
    out = {k: v for k, v in features.items() if k != "boxes"}
    out["words"] = dense(features["words"])
    out["word_boxes"] = _word_boxes(features, normalized_boxes)
    for key in ("id", "question", "answer"):
      out.setdefault(key, tf.constant(""))
    return bad_records.add_problem(out, problem)

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------
# The page image
# --------------------------------------------------------------------------------


def decode_page(ds: tf.data.Dataset, image_size: int = 64) -> tf.data.Dataset:
  """`image` bytes -> `images` uint8 [1, S, S, 3] (stretched, module docstring).

  A corrupt page sets `problem` ("corrupt image: ...") and becomes blank; an
  empty one (already reported by `validate`) is not decoded at all.
  """
  size = (image_size, image_size)

  def fn(features):
    data = features.get("image", tf.constant(""))
    image, problem = tf.cond(
        tf.strings.length(data) > 0, lambda: preprocessors.decode_image_bytes(data),
        lambda: (tf.zeros([1, 1, 3], tf.uint8), tf.constant("")))
    # pylint: disable-next=protected-access  (the same resize as the pp ops)
    image = preprocessors._resize(image, size, "bilinear", True)
    out = {k: v for k, v in features.items() if k != "image"}
    out["images"] = tf.ensure_shape(image, [image_size, image_size, 3])[None]
    return bad_records.add_problem(out, problem)

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
