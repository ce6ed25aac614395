"""Preprocessing for the image-caption data kind.

Two layers, on purpose:
  * seqio preprocessors (`decode_image`, `choose_caption`, `tokenize_caption`) turn
    raw records into model features inside a seqio Task; they are the same for
    every run that uses the task.
  * pp ops (`PP_OPS`, big_vision style) are chosen per run in the config as a
    string such as "random_resized_crop(64, scale=(0.5, 1.0))|flip_lr|value_range(-1, 1)"
    and applied by the pipeline after the task. Each op is called as
    `op(features, seed)`; random ops draw only from `seed` (stateless), which the
    pipeline derives from the run seed and the example's position in the stream.
"""
import ast
import io
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import vocab
from vlpjax.registry import Registry

Features = Dict[str, Any]
Op = Callable[[Features, tf.Tensor], Features]

# --------------------------------------------------------------------------------
# seqio preprocessors
# --------------------------------------------------------------------------------


def image_caption_output_features(vocabulary: Optional[seqio.Vocabulary] = None):
  """What an image-caption task yields: texts (no EOS), image, optional label."""
  return {
      "texts": seqio.Feature(vocabulary or vocab.default_vocabulary(), add_eos=False),
      # seqio checks only dtype and rank, so an image is a rank-3 feature.
      "image": seqio.ContinuousFeature(dtype=tf.uint8, rank=3),
      "label": seqio.ContinuousFeature(dtype=tf.int64, rank=0, required=False),
  }



def _pil_decode(data: bytes) -> Tuple[np.ndarray, bytes]:
  """(image, b"") or (a 1x1 black image, b"corrupt image: why")."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"), dtype=np.uint8), b""
  except Exception as e:  # pylint: disable=broad-except  (reported as the record's problem)
    return np.zeros([1, 1, 3], np.uint8), f"corrupt image: {e}".encode("utf-8")


def _has(data: tf.Tensor, prefix: bytes, suffix: bytes) -> tf.Tensor:
  size = tf.strings.length(data)
  head = tf.strings.substr(data, 0, len(prefix))
  tail = tf.strings.substr(data, tf.maximum(size - len(suffix), 0), len(suffix))
  return tf.logical_and(tf.equal(head, prefix), tf.equal(tail, suffix))


def _is_complete_jpeg_or_png(data: tf.Tensor) -> tf.Tensor:
  """Start and end markers present: the file is not garbage nor truncated."""
  jpeg = _has(data, b"\xff\xd8\xff", b"\xff\xd9")
  png = _has(data, b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82")
  return tf.logical_or(jpeg, png)


def decode_image_bytes(data: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Encoded bytes -> (uint8 [H, W, 3], problem string, "" when decoded).

  Complete JPEG and PNG files (nearly every record) are decoded by TF in C++.
  Anything else (empty, garbage, truncated files, other formats) goes to PIL
  through `tf.numpy_function`, which decodes what it can and otherwise returns a
  1x1 black image and the reason, so bad records can be skipped or reported by
  `bad_records.apply_policy` with their id. Keeping Python off the common path
  matters twice: decoding does not compete for the GIL with the training loop,
  and a process that exits while its iterator is prefetching does not hang
  (Python stops threads that want the GIL during shutdown, and the iterator then
  waits for them forever). A JPEG with intact markers but corrupt data still
  fails inside TF, with TF's message.
  """
  image, problem = tf.cond(
      _is_complete_jpeg_or_png(data),
      lambda: (tf.io.decode_image(data, channels=3, expand_animations=False),
               tf.constant("")),
      lambda: tuple(tf.numpy_function(_pil_decode, [data], (tf.uint8, tf.string),
                                      stateful=False)))
  image = tf.ensure_shape(image, [None, None, 3])
  # An absent field parses to b"" (sources default it so parsing never fails).
  problem = tf.where(tf.strings.length(data) > 0, problem, "missing image")
  return image, tf.ensure_shape(problem, [])


def decode_image(ds: tf.data.Dataset, key: str = "image") -> tf.data.Dataset:
  """Encoded image bytes -> uint8 [H, W, 3]; undecodable -> `problem` (bad_records)."""

  def fn(features):
    image, problem = decode_image_bytes(features[key])
    return bad_records.add_problem({**features, key: image}, problem)

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset(num_seeds=1)
def choose_caption(features: Features, seed: tf.Tensor,
                   key: str = "caption") -> Features:
  """Picks one of several captions (a rank-1 / ragged / sparse string feature).

  Uses seqio's per-example stateless seed, so the choice is fixed by the seed the
  task is built with and differs between epochs. A record without captions gets
  the empty caption instead of failing.
  """
  captions = features[key]
  if isinstance(captions, tf.SparseTensor):
    captions = tf.sparse.to_dense(captions, default_value="")
  elif isinstance(captions, tf.RaggedTensor):
    captions = captions.to_tensor(default_value="")
  if captions.shape.rank == 0:
    return features
  count = tf.shape(captions)[0]
  index = tf.random.stateless_uniform([], seed, minval=0, maxval=tf.maximum(count, 1),
                                      dtype=tf.int32)
  padded = tf.concat([captions, [""]], axis=0)
  return {**features, key: padded[tf.minimum(index, count)]}


def tokenize_caption(ds: tf.data.Dataset, output_features: Dict[str, seqio.Feature],
                     key: str = "caption", out_key: str = "texts") -> tf.data.Dataset:
  """`out_key` = token ids of the string `key`, with the vocabulary of `out_key`.

  seqio's own `tokenize` would run every output feature through its vocabulary
  and copy each to `*_pretokenized`, images included; this touches only text.
  The caption string is kept for evaluators and debugging.
  """
  feature = output_features[out_key]

  def fn(features):
    text = features[key]
    features = bad_records.add_problem(features, tf.where(
        tf.strings.length(tf.strings.strip(text)) > 0, "", f"empty {key}"))
    tokens = feature.vocabulary.encode_tf(text)
    if feature.add_eos:
      tokens = tf.concat([tokens, [feature.vocabulary.eos_id]], axis=0)
    return {**features, out_key: tf.cast(tokens, feature.dtype)}

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------
# pp ops: per-run preprocessing chosen by a config string
# --------------------------------------------------------------------------------

PP_OPS = Registry("preprocessing op")


def register_op(name: str, random: bool = False):
  """Registers a pp op factory under `name`; `random` ops are refused for eval.

  The factory takes the op's arguments from the pp string and returns
  `op(features, seed) -> features`; only random ops may use `seed`.
  """

  def decorator(factory):
    factory.is_random = random
    return PP_OPS.register(name)(factory)

  return decorator


def _hw(size) -> Tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _resize(image: tf.Tensor, hw, method: str, antialias: bool) -> tf.Tensor:
  out = tf.image.resize(image, hw, method=method, antialias=antialias)
  if image.dtype.is_integer:  # Keep uint8 so a later value_range sees 0..255.
    out = tf.clip_by_value(tf.round(out), image.dtype.min, image.dtype.max)
  return tf.cast(out, image.dtype)


@register_op("resize")
def resize(size, key: str = "image", method: str = "bilinear",
           antialias: bool = True) -> Op:
  """Resizes to `size` (int or (h, w)), ignoring the aspect ratio."""
  hw = _hw(size)

  def op(features, seed):
    del seed
    return {**features, key: _resize(features[key], hw, method, antialias)}

  return op


@register_op("central_crop")
def central_crop(size, key: str = "image") -> Op:
  """The centre `size` (int or (h, w)) crop; the image must be at least that big."""
  h, w = _hw(size)

  def op(features, seed):
    del seed
    image = features[key]
    shape = tf.shape(image)
    top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
    return {**features, key: tf.image.crop_to_bounding_box(image, top, left, h, w)}

  return op


@register_op("random_resized_crop", random=True)
def random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), key: str = "image",
                        method: str = "bilinear", antialias: bool = True) -> Op:
  """Inception crop: a random box of `scale` area and `ratio` aspect, resized."""
  hw = _hw(size)

  def op(features, seed):
    image = features[key]
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None, image.shape[-1]])  # slice forgets the channels.
    return {**features, key: _resize(crop, hw, method, antialias)}

  return op


@register_op("flip_lr", random=True)
def flip_lr(key: str = "image") -> Op:
  """Mirrors the image left-right with probability 1/2."""

  def op(features, seed):
    return {**features, key: tf.image.stateless_random_flip_left_right(features[key], seed)}

  return op


@register_op("value_range")
def value_range(lo: float = -1.0, hi: float = 1.0, in_min: float = 0.0,
                in_max: float = 255.0, key: str = "image") -> Op:
  """Maps [in_min, in_max] (uint8 pixels by default) linearly to float32 [lo, hi]."""

  def op(features, seed):
    del seed
    x = (tf.cast(features[key], tf.float32) - in_min) / (in_max - in_min)
    return {**features, key: lo + x * (hi - lo)}

  return op


def pad_to_length(tokens: tf.Tensor, length: int, pad_value: int = 0) -> tf.Tensor:
  tokens = tokens[:length]
  tokens = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]], constant_values=pad_value)
  return tf.ensure_shape(tokens, [length])


@register_op("pad_tokens")
def pad_tokens(length: int, key: str = "texts", pad_value: int = 0) -> Op:
  """Truncates or pads (with `pad_value`, seqio's pad id 0) a 1-D feature to `length`."""

  def op(features, seed):
    del seed
    return {**features, key: pad_to_length(features[key], length, pad_value)}

  return op


class PPChain:
  """A parsed pp string: applies its ops in order, each with its own seed."""

  def __init__(self, spec: str, ops: Sequence[Tuple[str, Op, bool]]):
    self.spec = spec
    self.ops = list(ops)

  @property
  def random_ops(self) -> List[str]:
    return [name for name, _, random in self.ops if random]

  def __call__(self, features: Features, seed: tf.Tensor) -> Features:
    seed = tf.cast(seed, tf.int64)
    for i, (_, op, _) in enumerate(self.ops):
      # Folding in the op's position keeps two random ops from sharing a draw.
      features = op(features, tf.random.experimental.stateless_fold_in(
          seed, tf.constant(i, tf.int64)))
    return features

  def __repr__(self):
    return f"PPChain({self.spec!r})"


def _flatten_or(node: ast.AST) -> List[ast.AST]:
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    return _flatten_or(node.left) + _flatten_or(node.right)
  return [node]


def _literal(node: ast.AST, spec: str):
  try:
    return ast.literal_eval(node)
  except ValueError:
    raise ValueError(f"pp {spec!r}: arguments must be Python literals, "
                     f"got {ast.unparse(node)!r}.") from None


def parse_pp(spec: str) -> PPChain:
  """Parses "op1(args)|op2|..." into a `PPChain`; an empty string is the identity.

  The string is parsed as a Python expression (so "|" inside a quoted argument is
  fine) but never evaluated: only op names and literal arguments are accepted.
  """
  spec = spec.strip()
  if not spec:
    return PPChain(spec, [])
  try:
    tree = ast.parse(spec, mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"pp {spec!r} is not of the form 'op(args)|op|...': {e.msg}") from None
  ops = []
  for node in _flatten_or(tree):
    if isinstance(node, ast.Name):
      name, args, kwargs = node.id, [], {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
      name = node.func.id
      args = [_literal(a, spec) for a in node.args]
      kwargs = {k.arg: _literal(k.value, spec) for k in node.keywords}
    else:
      raise ValueError(f"pp {spec!r}: {ast.unparse(node)!r} is not 'op' or 'op(args)'.")
    factory = PP_OPS.get(name)  # Unknown names fail with the nearest ones.
    try:
      op = factory(*args, **kwargs)
    except TypeError as e:
      raise ValueError(f"pp op {ast.unparse(node)!r}: {e}") from None
    ops.append((name, op, getattr(factory, "is_random", False)))
  return PPChain(spec, ops)
