"""Image-aware prefix-LM feature conversion and packing (pure numpy).

seqio's packing handles rank-1 features only and refuses pass-through features, so
images cannot ride along in a packed row. This module converts prefix-LM examples
the way `seqio.PrefixLMFeatureConverter` does and packs them itself, carrying the
images of every packed row.

Per-example input (a dict of numpy arrays):
  inputs   int32 [n_in]        prefix tokens; each image's place is ONE `image_token_id`
  targets  int32 [n_tgt >= 1]  tokens to predict; must not contain `image_token_id`
  images   float32 [n_img, *image_shape] in placeholder order (may be absent when
           n_img == 0); image_shape is (H, W, 3) for pictures, or (D,) for precomputed
           features (video frames' features, one "image" per frame)
  id       optional; named in error messages
  input_boxes  optional float32 [n_in, 4]: a per-token layout box aligned with `inputs`
           (document kinds; 0 on tokens without a box, such as image placeholders)
  image_times  optional float32 [n_img] in [0, 1]: each image's relative time in its
           clip (video kinds), aligned with `images`
  loss_weight  optional scalar, finite and >= 0 (default 1): the weight of the example's
           target tokens in the loss (per-task loss weights, `prefix_lm_pipeline`)

Conversion. Each placeholder expands into `tokens_per_image` (T) consecutive
`image_token_id` positions, where the model later scatters the T embeddings of that
image (PaliGemma style); lengths are therefore exact before packing. With
`n_pre = len(expanded inputs)`, the features of one example (length n) follow seqio:

  decoder_target_tokens    concat(expanded inputs, targets)
  decoder_input_tokens     the same shifted right by one within the segment, BOS = 0
  decoder_loss_weights     float32: `loss_weight` (1 by default) exactly on the targets,
                           0 elsewhere (never on prompt or image tokens)
  decoder_causal_attention 1 on the first n_pre + 1 positions (seqio's definition: in
                           input-token space those hold BOS plus every prefix token, so
                           the position that reads the last prefix token and predicts the
                           first target is still part of the bidirectional prefix)
  decoder_segment_ids      1.. per packed example, 0 on padding
  decoder_positions        0.. restarting in every segment, 0 on padding

Worked example, T = 2, image_token_id = 9, inputs [5, 9, 6], targets [7, 1],
loss_weight 0.5 (without it the weights are 1.0 where 0.5 is shown):

  decoder_target_tokens    [5, 9, 9, 6, 7, 1]
  decoder_input_tokens     [0, 5, 9, 9, 6, 7]
  decoder_loss_weights     [0, 0, 0, 0, .5, .5]
  decoder_causal_attention [1, 1, 1, 1, 1, 0]
  decoder_segment_ids      [1, 1, 1, 1, 1, 1]
  decoder_positions        [0, 1, 2, 3, 4, 5]

The model embeds `decoder_input_tokens` and replaces the image-token positions there
with image embeddings. Targets never hold image tokens, so every run of T image tokens
lies inside the prefix, appears whole in both token features, and is covered by
`decoder_causal_attention`.

Every token feature is int32 except `decoder_loss_weights` (float32).

Packed rows (`pack`, `pack_iter`) hold the token features at [row_length] plus
  images             float32 [max_images_per_row, *image_shape], zeros in empty slots
  image_mask         bool [max_images_per_row]
  image_segment_ids  int32 [max_images_per_row], the segment of each image, 0 if empty
Invariant: the valid image slots are a prefix of the slots, and taking the
image-token positions of a row in order in groups of T, the k-th group belongs to the
k-th valid slot (in `decoder_target_tokens`, and one position later in
`decoder_input_tokens`).

Layout boxes. When examples carry `input_boxes`, conversion gives `decoder_boxes`
float32 [n, 4] aligned with `decoder_input_tokens` (the tokens the model embeds, so a
UDOP-style model adds `layout_embedding(decoder_boxes)` to their embeddings as they are):
each placeholder's box row expands to T zero rows, the boxes then shift right by one like
the tokens (BOS gets 0), and target tokens get 0. In the example above, with
input_boxes [a, 0, b]: decoder_boxes = [0, a, 0, 0, b, 0]. Rows carry `decoder_boxes`
[row_length, 4] (0 on padding and on examples without boxes) when one of their examples
has boxes, or always / never with `with_boxes=True / False`; `batch_rows` gives rows
without them zeros when others in the batch have them. Truncation cuts the boxes with
their tokens.

Image times. When examples carry `image_times`, conversion keeps them as `image_times`
float32 [n_img], and rows carry `image_times` float32 [max_images_per_row] aligned with
the image slots (0 in empty slots and for the images of examples without times) when
one of their examples has times, or always / never with `with_image_times=True / False`;
`batch_rows` fills zeros as for boxes. An image dropped by truncation takes its time
with it.

Examples that do not fit one row (see `truncate_example`) are truncated or rejected
(`on_too_long='truncate' | 'error'`):
  * more images than `max_images_per_row`: the trailing placeholders are removed from
    `inputs` together with their images, so the first `max_images_per_row` images stay;
  * longer than `row_length` after expansion: the head of the sequence is kept. The
    prefix gets at most `row_length - 1` tokens, so that at least one target token (and
    thus some loss) survives; it is cut from its end, and an image whose T tokens would
    be cut is dropped whole, with its image, and so is everything after it in `inputs`.
    The targets then fill the rest of the row from their start.
Truncation keeps `loss_weight`, and cuts `input_boxes` and `image_times` with their
tokens and images.
"""
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Features = Dict[str, np.ndarray]

TOKEN_FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                  "decoder_causal_attention", "decoder_segment_ids", "decoder_positions")
IMAGE_FEATURES = ("images", "image_mask", "image_segment_ids")
BOX_FEATURE = "decoder_boxes"
TIMES_FEATURE = "image_times"
LOSS_WEIGHT = "loss_weight"
ON_TOO_LONG = ("truncate", "error")


def _name(example: Mapping[str, Any]) -> str:
  """How error messages name an example: its `id` when it has one."""
  ex_id = example.get("id")
  if ex_id is None:
    return "example"
  if isinstance(ex_id, np.ndarray):
    ex_id = ex_id.item() if ex_id.size == 1 else ex_id.tolist()
  if isinstance(ex_id, bytes):
    ex_id = ex_id.decode("utf-8", "replace")
  return f"example {ex_id!r}"


def _images_of(example: Mapping[str, Any], image_shape: Optional[Sequence[int]]) -> np.ndarray:
  """The example's images as float32 [n, *image_shape]; text-only examples may omit them.

  Without `image_shape`, pictures [n, H, W, 3] are expected.
  """
  images = example.get("images")
  if images is None or np.size(images) == 0:
    shape = tuple(image_shape) if image_shape is not None else (0, 0, 3)
    return np.zeros((0,) + shape, np.float32)
  images = np.asarray(images, np.float32)
  if image_shape is None:
    ok, want = images.ndim == 4 and images.shape[-1] == 3, "[n, H, W, 3]"
  else:
    ok = images.shape[1:] == tuple(image_shape)
    want = f"[n, {', '.join(map(str, image_shape))}]"
  if not ok:
    raise ValueError(f"{_name(example)}: images have shape {list(images.shape)}, "
                     f"expected {want}")
  return images


def validate_example(example: Mapping[str, Any], *, image_token_id: int,
                     image_shape: Optional[Sequence[int]] = None
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checks one raw example; returns its (inputs, targets, images) as int32/float32."""
  if image_token_id == 0:
    # 0 is padding and BOS in the seqio convention; image runs must be distinguishable.
    raise ValueError("image_token_id must not be 0 (padding / BOS)")
  inputs = np.asarray(example.get("inputs", np.zeros(0, np.int32)))
  targets = np.asarray(example.get("targets", np.zeros(0, np.int32)))
  for key, value in (("inputs", inputs), ("targets", targets)):
    if value.ndim != 1 or (value.size and not np.issubdtype(value.dtype, np.integer)):
      raise ValueError(f"{_name(example)}: {key} must be a 1-D integer array, "
                       f"got {value.dtype} {list(value.shape)}")
  if targets.size == 0:
    raise ValueError(f"{_name(example)}: targets are empty; a prefix-LM example needs "
                     "at least one target token")
  if np.any(targets == image_token_id):
    raise ValueError(f"{_name(example)}: targets contain the image token "
                     f"{image_token_id}; images belong in inputs")
  images = _images_of(example, image_shape)
  n_placeholders = int(np.sum(inputs == image_token_id))
  if n_placeholders != images.shape[0]:
    raise ValueError(f"{_name(example)}: inputs have {n_placeholders} image placeholders "
                     f"(id {image_token_id}) but there are {images.shape[0]} images")
  return inputs.astype(np.int32), targets.astype(np.int32), images


def _boxes_of(example: Mapping[str, Any], n_inputs: int) -> Optional[np.ndarray]:
  """The example's `input_boxes` as float32 [n_inputs, 4], or None if it has none."""
  boxes = example.get("input_boxes")
  if boxes is None:
    return None
  boxes = np.asarray(boxes, np.float32)
  if boxes.shape != (n_inputs, 4):
    raise ValueError(f"{_name(example)}: input_boxes have shape {list(boxes.shape)}, "
                     f"expected [{n_inputs}, 4] (one box per input token)")
  return boxes


def _image_times_of(example: Mapping[str, Any], n_images: int) -> Optional[np.ndarray]:
  """The example's `image_times` as float32 [n_images] in [0, 1], or None if it has none."""
  times = example.get(TIMES_FEATURE)
  if times is None:
    return None
  times = np.asarray(times, np.float32)
  if times.shape != (n_images,):
    raise ValueError(f"{_name(example)}: image_times have shape {list(times.shape)}, "
                     f"expected [{n_images}] (one time per image)")
  bad = ~(np.isfinite(times) & (times >= 0) & (times <= 1))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{_name(example)}: image_times[{i}] is {times[i]:g}; times are "
                     "relative to the clip, finite and in [0, 1]")
  return times


def _loss_weight_of(example: Mapping[str, Any]) -> float:
  """The example's `loss_weight` (default 1), a finite scalar >= 0."""
  weight = example.get(LOSS_WEIGHT, 1.0)
  if np.ndim(weight) != 0:
    raise ValueError(f"{_name(example)}: loss_weight must be a scalar, got shape "
                     f"{list(np.shape(weight))}")
  weight = float(weight)
  if not (np.isfinite(weight) and weight >= 0):
    raise ValueError(f"{_name(example)}: loss_weight is {weight:g}; it must be finite "
                     "and >= 0")
  return weight


def truncate_example(example: Mapping[str, Any], *, row_length: int, max_images_per_row: int,
                     tokens_per_image: int, image_token_id: int,
                     image_shape: Optional[Sequence[int]] = None,
                     on_too_long: str = "truncate") -> Features:
  """Makes a raw example fit one row (rules in the module docstring), or raises.

  Returns a new raw example {inputs, targets, images (, input_boxes, image_times,
  loss_weight, id)}; an example that fits is returned unchanged (validated and with
  normalized dtypes).
  """
  if on_too_long not in ON_TOO_LONG:
    raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
  inputs, targets, images = validate_example(example, image_token_id=image_token_id,
                                             image_shape=image_shape)
  boxes = _boxes_of(example, inputs.size)
  times = _image_times_of(example, images.shape[0])
  loss_weight = _loss_weight_of(example)
  is_image = inputs == image_token_id
  if images.shape[0] > max_images_per_row:
    if on_too_long == "error":
      raise ValueError(f"{_name(example)}: {images.shape[0]} images, more than "
                       f"max_images_per_row={max_images_per_row}")
    # Drop trailing placeholders together with their images: token k-th placeholder
    # and image k stay paired because both keep their order.
    drop = np.flatnonzero(is_image)[max_images_per_row:]
    inputs = np.delete(inputs, drop)
    boxes = None if boxes is None else np.delete(boxes, drop, axis=0)
    images = images[:max_images_per_row]
    times = None if times is None else times[:max_images_per_row]
    is_image = inputs == image_token_id

  cost = np.where(is_image, tokens_per_image, 1)  # expanded length of each input token
  n_prefix = int(cost.sum())
  if n_prefix + targets.size > row_length:
    if on_too_long == "error":
      raise ValueError(f"{_name(example)}: {n_prefix + targets.size} tokens after expanding "
                       f"images ({n_prefix} prefix + {targets.size} targets), more than "
                       f"row_length={row_length}")
    # Keep the longest head of `inputs` whose expansion fits in row_length - 1: a
    # placeholder that would not fit whole stops the prefix there, so no image is split.
    n_keep = int(np.sum(np.cumsum(cost) <= row_length - 1))
    inputs = inputs[:n_keep]
    boxes = None if boxes is None else boxes[:n_keep]
    images = images[:int(np.sum(inputs == image_token_id))]
    times = None if times is None else times[:images.shape[0]]
    n_prefix = int(cost[:n_keep].sum())
    targets = targets[:row_length - n_prefix]

  out = {"inputs": inputs, "targets": targets, "images": images}
  if boxes is not None:
    out["input_boxes"] = boxes
  if times is not None:
    out[TIMES_FEATURE] = times
  if LOSS_WEIGHT in example:
    out[LOSS_WEIGHT] = loss_weight
  if "id" in example:
    out["id"] = example["id"]
  return out


def convert_example(example: Mapping[str, Any], *, tokens_per_image: int, image_token_id: int,
                    image_shape: Optional[Sequence[int]] = None) -> Features:
  """Unpacked prefix-LM features of one raw example (conventions in the module docstring).

  Returns the six token features (length = expanded inputs + targets; int32 but
  `decoder_loss_weights` float32), `images` float32 [n_img, *image_shape] and, for
  examples with `input_boxes`, `decoder_boxes` float32 [n, 4], for examples with
  `image_times`, `image_times` float32 [n_img]. No truncation: see `truncate_example`.
  """
  inputs, targets, images = validate_example(example, image_token_id=image_token_id,
                                             image_shape=image_shape)
  boxes = _boxes_of(example, inputs.size)
  times = _image_times_of(example, images.shape[0])
  loss_weight = _loss_weight_of(example)
  is_image = inputs == image_token_id
  repeats = np.where(is_image, tokens_per_image, 1)
  expanded = np.repeat(inputs, repeats)
  n_prefix, n = expanded.size, expanded.size + targets.size
  target_tokens = np.concatenate([expanded, targets]).astype(np.int32)
  positions = np.arange(n, dtype=np.int32)
  out = {
      "decoder_target_tokens": target_tokens,
      "decoder_input_tokens": np.concatenate([[0], target_tokens[:-1]]).astype(np.int32),
      "decoder_loss_weights": np.where(positions >= n_prefix, loss_weight,
                                       0.0).astype(np.float32),
      # seqio: positions < inputs_width + 1 (see module docstring for why the +1).
      "decoder_causal_attention": (positions < n_prefix + 1).astype(np.int32),
      "decoder_segment_ids": np.ones(n, np.int32),
      "decoder_positions": positions,
      "images": images,
  }
  if boxes is not None:
    # Aligned with the target tokens first, then shifted like decoder_input_tokens.
    aligned = np.zeros((n, 4), np.float32)
    aligned[:n_prefix] = np.repeat(np.where(is_image[:, None], 0.0, boxes), repeats, axis=0)
    out[BOX_FEATURE] = np.concatenate([np.zeros((1, 4), np.float32), aligned[:-1]])
  if times is not None:
    out[TIMES_FEATURE] = times
  return out


class _OpenRow:
  """A row being filled: converted examples plus free token and image capacity."""

  def __init__(self, row_length: int, max_images: int):
    self.examples: List[Features] = []
    self.free_tokens = row_length
    self.free_images = max_images

  def fits(self, ex: Features) -> bool:
    return (ex["decoder_target_tokens"].size <= self.free_tokens and
            ex["images"].shape[0] <= self.free_images)

  def add(self, ex: Features) -> None:
    self.examples.append(ex)
    self.free_tokens -= ex["decoder_target_tokens"].size
    self.free_images -= ex["images"].shape[0]


def _finish_row(examples: Sequence[Features], row_length: int, max_images: int,
                image_shape: Sequence[int], with_boxes: Optional[bool] = None,
                with_image_times: Optional[bool] = None) -> Features:
  """Lays converted examples side by side, numbering segments 1.. in order.

  The row has `decoder_boxes` if `with_boxes`, or (None) if an example has boxes;
  `image_times` likewise with `with_image_times`.
  """
  if with_boxes is None:
    with_boxes = any(BOX_FEATURE in ex for ex in examples)
  if with_image_times is None:
    with_image_times = any(TIMES_FEATURE in ex for ex in examples)
  row = {k: np.zeros(row_length, np.int32) for k in TOKEN_FEATURES}
  row["decoder_loss_weights"] = np.zeros(row_length, np.float32)
  if with_boxes:
    row[BOX_FEATURE] = np.zeros((row_length, 4), np.float32)
  if with_image_times:
    row[TIMES_FEATURE] = np.zeros(max_images, np.float32)
  row["images"] = np.zeros((max_images,) + tuple(image_shape), np.float32)
  row["image_mask"] = np.zeros(max_images, bool)
  row["image_segment_ids"] = np.zeros(max_images, np.int32)
  start = n_img = 0
  for segment, ex in enumerate(examples, start=1):
    n = ex["decoder_target_tokens"].size
    for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
              "decoder_causal_attention", "decoder_positions"):
      row[k][start:start + n] = ex[k]
    row["decoder_segment_ids"][start:start + n] = segment
    if with_boxes and BOX_FEATURE in ex:
      row[BOX_FEATURE][start:start + n] = ex[BOX_FEATURE]
    k = ex["images"].shape[0]
    row["images"][n_img:n_img + k] = ex["images"]
    row["image_mask"][n_img:n_img + k] = True
    row["image_segment_ids"][n_img:n_img + k] = segment
    if with_image_times and TIMES_FEATURE in ex:
      row[TIMES_FEATURE][n_img:n_img + k] = ex[TIMES_FEATURE]
    start += n
    n_img += k
  return row


def pack_iter(examples: Iterable[Mapping[str, Any]], *, row_length: int,
              max_images_per_row: int, tokens_per_image: int, image_token_id: int,
              image_shape: Sequence[int], on_too_long: str = "truncate",
              max_open_rows: Optional[int] = 8, with_boxes: Optional[bool] = None,
              with_image_times: Optional[bool] = None) -> Iterator[Features]:
  """Packs a stream of raw examples into rows, first-fit, deterministically.

  Each example (after `truncate_example`) goes whole into the first open row with room
  for its tokens and its images, else into a new row. A row is emitted as soon as its
  tokens are full; when a new row is needed and `max_open_rows` rows are open, the
  oldest open row is emitted first (bounded memory and latency on a stream). The rest
  are emitted, oldest first, when the stream ends. `max_open_rows=None` never evicts.
  `with_boxes` (None: rows whose examples have `input_boxes`) says which rows carry
  `decoder_boxes`, and `with_image_times` (None: rows whose examples have `image_times`)
  which carry `image_times` (module docstring). `image_shape` is one image's shape:
  (H, W, 3), or (D,) for feature vectors. Arguments are checked here, at call time;
  examples as they are packed.
  """
  if tokens_per_image < 1:
    raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
  if image_token_id == 0:
    raise ValueError("image_token_id must not be 0 (padding / BOS)")
  if max_images_per_row > 0 and tokens_per_image + 1 > row_length:
    # An image's tokens plus one target token must fit a row, or no image ever would.
    raise ValueError(f"row_length={row_length} cannot hold one image "
                     f"(tokens_per_image={tokens_per_image}) and a target token")
  if max_open_rows is not None and max_open_rows < 1:
    raise ValueError(f"max_open_rows must be >= 1 or None, got {max_open_rows}")
  if on_too_long not in ON_TOO_LONG:
    raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
  return _pack_gen(iter(examples), row_length, max_images_per_row, tokens_per_image,
                   image_token_id, tuple(image_shape), on_too_long, max_open_rows,
                   with_boxes, with_image_times)


def _pack_gen(examples: Iterator[Mapping[str, Any]], row_length: int, max_images_per_row: int,
              tokens_per_image: int, image_token_id: int, image_shape: Tuple[int, ...],
              on_too_long: str, max_open_rows: Optional[int],
              with_boxes: Optional[bool] = None,
              with_image_times: Optional[bool] = None) -> Iterator[Features]:
  """The generator behind `pack_iter` (separate so that bad arguments fail eagerly)."""
  finish = lambda r: _finish_row(r.examples, row_length, max_images_per_row, image_shape,
                                 with_boxes, with_image_times)
  open_rows: List[_OpenRow] = []
  for raw in examples:
    raw = truncate_example(raw, row_length=row_length, max_images_per_row=max_images_per_row,
                           tokens_per_image=tokens_per_image, image_token_id=image_token_id,
                           image_shape=image_shape, on_too_long=on_too_long)
    ex = convert_example(raw, tokens_per_image=tokens_per_image,
                         image_token_id=image_token_id, image_shape=image_shape)
    row = next((r for r in open_rows if r.fits(ex)), None)
    if row is None:
      if max_open_rows is not None and len(open_rows) >= max_open_rows:
        yield finish(open_rows.pop(0))
      row = _OpenRow(row_length, max_images_per_row)
      open_rows.append(row)
    row.add(ex)
    if row.free_tokens == 0:
      open_rows.remove(row)
      yield finish(row)
  for row in open_rows:
    yield finish(row)


def pack(examples: Iterable[Mapping[str, Any]], *, row_length: int, max_images_per_row: int,
         tokens_per_image: int, image_token_id: int, image_shape: Sequence[int],
         on_too_long: str = "truncate", max_open_rows: Optional[int] = None,
         with_boxes: Optional[bool] = None,
         with_image_times: Optional[bool] = None) -> List[Features]:
  """All rows of `pack_iter` as a list; by default first-fit over every row so far."""
  return list(pack_iter(examples, row_length=row_length, max_images_per_row=max_images_per_row,
                        tokens_per_image=tokens_per_image, image_token_id=image_token_id,
                        image_shape=image_shape, on_too_long=on_too_long,
                        max_open_rows=max_open_rows, with_boxes=with_boxes,
                        with_image_times=with_image_times))


def batch_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> Features:
  """Stacks rows into a batch: every feature gets a leading [B] dimension.

  If some rows have `decoder_boxes` or `image_times`, rows without them get zeros.
  """
  if not rows:
    raise ValueError("batch_rows needs at least one row")
  optional = {BOX_FEATURE: rows[0]["decoder_target_tokens"].shape + (4,),
              TIMES_FEATURE: rows[0]["image_mask"].shape}
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in optional}
  for key, shape in optional.items():
    if any(key in r for r in rows):
      zeros = np.zeros(shape, np.float32)
      batch[key] = np.stack([r.get(key, zeros) for r in rows])
  return batch


def attention_mask(segment_ids, causal_attention, xp=None):
  """Prefix-LM attention: bool [..., L, L], query on axis -2, key on axis -1.

  q may attend to k iff both are in the same nonzero segment and (k <= q, or both are
  in the prefix, i.e. causal_attention == 1). Works on numpy and jax.numpy arrays (also
  traced ones) with any leading batch dims; `xp` picks the array module, by default
  numpy for numpy inputs and jax.numpy otherwise.
  """
  if xp is None:
    if isinstance(segment_ids, np.ndarray) and isinstance(causal_attention, np.ndarray):
      xp = np
    else:
      import jax.numpy as xp  # pylint: disable=g-import-not-at-top  (keeps numpy users JAX-free)
  segment_ids = xp.asarray(segment_ids)
  prefix = xp.asarray(causal_attention) != 0
  length = segment_ids.shape[-1]
  same_segment = ((segment_ids[..., :, None] == segment_ids[..., None, :]) &
                  (segment_ids[..., :, None] != 0))
  idx = xp.arange(length)
  causal = idx[None, :] <= idx[:, None]
  both_prefix = prefix[..., :, None] & prefix[..., None, :]
  return same_segment & (causal | both_prefix)
