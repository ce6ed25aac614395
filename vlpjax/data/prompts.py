"""Prompt batches for generation: one example per row, the prefix a packed row would hold.

Evaluators and prediction feed a family's `generate(params, prompts, ...)` with what a
prefix-LM example's prefix looks like in a packed training row (`vlpjax/data/packing.py`),
so a model sees at test time exactly what it saw in training. The prompt of an example is
the first n_prefix + 1 positions of its packed `decoder_input_tokens`: BOS (0), then its
`inputs` with each `<image>` expanded to T `image_token_id` positions. The features are
built by packing's own `truncate_example` and `convert_example`, so the two cannot disagree.

`prompt_batch` output (B rows, P = prompt_length, N = max_images):

  decoder_input_tokens  int32 [B, P]   the prompt, right-padded with 0
  prompt_mask           bool [B, P]    True on the prompt's tokens
  images                float32 [B, N, *image_shape], zeros in empty slots
  image_mask            bool [B, N]    the valid slots (a prefix of the slots)
  image_segment_ids     int32 [B, N]   1 on valid slots, else 0 (one example per row)
  image_times           float32 [B, N] each image's relative time (videos), 0 elsewhere;
                        present when some example has `image_times` (or with_image_times)
  decoder_boxes         float32 [B, P, 4] layout boxes aligned with decoder_input_tokens as
                        packing aligns them (documents); present when some example has
                        `input_boxes` (or with_boxes)
  targets               int32 [B, max_target_length] the example's targets, 0-padded and
                        cut when longer (references for scoring; models must not read them)

Prompts that do not fit. A prompt needs P >= n_prefix + 1 (BOS plus the expanded inputs)
and at most N images. With `on_too_long="truncate"` (the default) such an example is cut
exactly as packing cuts it into a row of `row_length = P`: trailing images beyond N are
dropped with their placeholders, then the prefix keeps at most P - 1 tokens, an image that
would not fit whole is dropped with everything after it. That is the prefix training
showed the model for the same example in a row of P tokens, so test and training agree.
`on_too_long="error"` raises a ValueError naming the example instead. `prompt_size` tells
whether an example fits, so callers can count the cut ones.

Rows beyond the examples (`batch_size` larger than the number of examples) are BOS-only
prompts with no images and zero targets: a well-defined prompt that generation can run on
(decoding needs a valid position per row), to be ignored by the caller.
"""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from vlpjax.data import packing

BOS_ID = 0
ON_TOO_LONG = packing.ON_TOO_LONG


def _name(example: Mapping[str, Any]) -> str:
  ex_id = example.get("id")
  if isinstance(ex_id, np.ndarray):
    ex_id = ex_id.item() if ex_id.size == 1 else ex_id.tolist()
  if isinstance(ex_id, bytes):
    ex_id = ex_id.decode("utf-8", "replace")
  return "example" if ex_id is None else f"example {ex_id!r}"


def prompt_size(example: Mapping[str, Any], *, tokens_per_image: int,
                image_token_id: int) -> Tuple[int, int]:
  """(prompt tokens BOS included with images expanded, number of images) of an example."""
  inputs = np.asarray(example.get("inputs", np.zeros(0, np.int32)))
  num_images = int(np.sum(inputs == image_token_id))
  return 1 + inputs.size + num_images * (tokens_per_image - 1), num_images


def _prompt_features(example: Mapping[str, Any], *, tokens_per_image: int,
                     image_token_id: int, image_shape: Sequence[int], prompt_length: int,
                     max_images: int, on_too_long: str) -> Dict[str, np.ndarray]:
  """One example's unpadded prompt: tokens [n], images [k, ...] (, boxes [n, 4], times [k])."""
  length, num_images = prompt_size(example, tokens_per_image=tokens_per_image,
                                   image_token_id=image_token_id)
  if on_too_long == "error" and (length > prompt_length or num_images > max_images):
    raise ValueError(f"{_name(example)}: its prompt has {length} tokens (BOS and the inputs "
                     f"with {num_images} images of {tokens_per_image} tokens) and "
                     f"{num_images} images; prompt_length={prompt_length} and "
                     f"max_images={max_images} do not hold it")
  # A one-token stand-in target: truncating to a row of P then cuts only the prefix, to at
  # most P - 1 tokens, so BOS and the prefix fit P. The real targets are not part of it.
  stand_in = {k: v for k, v in example.items() if k not in ("targets", packing.LOSS_WEIGHT)}
  stand_in["targets"] = np.ones(1, np.int32)
  raw = packing.truncate_example(stand_in, row_length=prompt_length,
                                 max_images_per_row=max_images,
                                 tokens_per_image=tokens_per_image,
                                 image_token_id=image_token_id, image_shape=image_shape)
  converted = packing.convert_example(raw, tokens_per_image=tokens_per_image,
                                      image_token_id=image_token_id, image_shape=image_shape)
  n = int(np.sum(converted["decoder_causal_attention"]))  # n_prefix + 1 (module docstring)
  out = {"decoder_input_tokens": converted["decoder_input_tokens"][:n],
         "images": converted["images"]}
  if packing.BOX_FEATURE in converted:
    out[packing.BOX_FEATURE] = converted[packing.BOX_FEATURE][:n]
  if packing.TIMES_FEATURE in converted:
    out[packing.TIMES_FEATURE] = converted[packing.TIMES_FEATURE]
  return out


def _targets_of(example: Mapping[str, Any]) -> np.ndarray:
  targets = np.asarray(example.get("targets", np.zeros(0, np.int32)))
  if targets.ndim != 1 or (targets.size and not np.issubdtype(targets.dtype, np.integer)):
    raise ValueError(f"{_name(example)}: targets must be a 1-D integer array, got "
                     f"{targets.dtype} {list(targets.shape)}")
  return targets.astype(np.int32)


def prompt_batch(examples: Sequence[Mapping[str, Any]], *, tokens_per_image: int,
                 image_token_id: int, image_shape: Sequence[int], prompt_length: int,
                 max_images: int, max_target_length: int,
                 batch_size: Optional[int] = None, on_too_long: str = "truncate",
                 with_boxes: Optional[bool] = None,
                 with_image_times: Optional[bool] = None) -> Dict[str, np.ndarray]:
  """Raw prefix-LM examples -> a prompt batch, one example per row (module docstring).

  Args:
    examples: dicts with `inputs`, `images`, optional `targets`, `input_boxes`,
      `image_times`, `id` (as `packing.pack` takes them).
    tokens_per_image: T, positions each image takes.
    image_token_id: the `<image>` id.
    image_shape: one image's shape, (S, S, 3), or (D,) for frame features.
    prompt_length: P, the prompt axis.
    max_images: N, image slots per row.
    max_target_length: the targets axis.
    batch_size: rows; default len(examples). Extra rows are BOS-only prompts.
    on_too_long: "truncate" (as packing does into a row of P) or "error".
    with_boxes, with_image_times: force `decoder_boxes` / `image_times` on (True) or off
      (False); None: present when some example has `input_boxes` / `image_times`.
  """
  if on_too_long not in ON_TOO_LONG:
    raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, got {on_too_long!r}")
  for name, value, low in (("prompt_length", prompt_length, 1), ("max_images", max_images, 0),
                           ("max_target_length", max_target_length, 1),
                           ("tokens_per_image", tokens_per_image, 1)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  batch_size = len(examples) if batch_size is None else batch_size
  if batch_size < max(len(examples), 1):
    raise ValueError(f"batch_size={batch_size} cannot hold {len(examples)} examples "
                     "(and a batch needs a row)")
  prompts = [_prompt_features(ex, tokens_per_image=tokens_per_image,
                              image_token_id=image_token_id, image_shape=image_shape,
                              prompt_length=prompt_length, max_images=max_images,
                              on_too_long=on_too_long) for ex in examples]
  if with_boxes is None:
    with_boxes = any(packing.BOX_FEATURE in p for p in prompts)
  if with_image_times is None:
    with_image_times = any(packing.TIMES_FEATURE in p for p in prompts)

  batch = {
      "decoder_input_tokens": np.zeros((batch_size, prompt_length), np.int32),
      "prompt_mask": np.zeros((batch_size, prompt_length), bool),
      "images": np.zeros((batch_size, max_images) + tuple(image_shape), np.float32),
      "image_mask": np.zeros((batch_size, max_images), bool),
      "image_segment_ids": np.zeros((batch_size, max_images), np.int32),
      "targets": np.zeros((batch_size, max_target_length), np.int32),
  }
  if with_image_times:
    batch[packing.TIMES_FEATURE] = np.zeros((batch_size, max_images), np.float32)
  if with_boxes:
    batch[packing.BOX_FEATURE] = np.zeros((batch_size, prompt_length, 4), np.float32)
  batch["prompt_mask"][:, 0] = True  # Padding rows: a BOS-only prompt (module docstring).
  for row, (example, prompt) in enumerate(zip(examples, prompts)):
    n, k = prompt["decoder_input_tokens"].size, prompt["images"].shape[0]
    batch["decoder_input_tokens"][row, :n] = prompt["decoder_input_tokens"]
    batch["prompt_mask"][row, :n] = True
    batch["images"][row, :k] = prompt["images"]
    batch["image_mask"][row, :k] = True
    batch["image_segment_ids"][row, :k] = 1
    if with_image_times and packing.TIMES_FEATURE in prompt:
      batch[packing.TIMES_FEATURE][row, :k] = prompt[packing.TIMES_FEATURE]
    if with_boxes and packing.BOX_FEATURE in prompt:
      batch[packing.BOX_FEATURE][row, :n] = prompt[packing.BOX_FEATURE]
    targets = _targets_of(example)[:max_target_length]
    batch["targets"][row, :targets.size] = targets
  return batch
