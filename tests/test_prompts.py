"""Prompt batches: each row is the prefix its example has in a packed training row."""
import numpy as np
import pytest

from vlpjax.data import packing
from vlpjax.data import prompts

IMAGE_ID, T = 9, 2
SIZE = 4
PROMPT_LEN, SLOTS, TARGET_LEN = 12, 2, 6


def example(i, n_img, text, targets, boxes=False, times=False, image_shape=(SIZE, SIZE, 3)):
  rng = np.random.default_rng(i)
  inputs = np.array([IMAGE_ID] * n_img + list(text), np.int32)
  ex = dict(id=f"ex{i}", inputs=inputs, targets=np.array(targets, np.int32),
            images=rng.uniform(-1, 1, (n_img,) + image_shape).astype(np.float32))
  if boxes:
    coords = rng.uniform(0.05, 1, (inputs.size, 4)).astype(np.float32)
    ex["input_boxes"] = np.where((inputs == IMAGE_ID)[:, None], 0.0, coords)
  if times:
    ex["image_times"] = np.sort(rng.uniform(0, 1, n_img)).astype(np.float32)
  return ex


def args(image_shape=(SIZE, SIZE, 3), **kwargs):
  return dict(dict(tokens_per_image=T, image_token_id=IMAGE_ID, image_shape=image_shape,
                   prompt_length=PROMPT_LEN, max_images=SLOTS,
                   max_target_length=TARGET_LEN), **kwargs)


def packed_row(ex, image_shape=(SIZE, SIZE, 3)):
  """The example packed alone into a row of PROMPT_LEN tokens (the reference)."""
  rows = packing.pack([ex], row_length=PROMPT_LEN, max_images_per_row=SLOTS,
                      tokens_per_image=T, image_token_id=IMAGE_ID, image_shape=image_shape)
  assert len(rows) == 1
  return rows[0]


def examples_for(image_shape):
  """Images, boxes and times in all combinations, and every way a prompt can be cut."""
  ex = lambda *a, **k: example(*a, image_shape=image_shape, **k)
  examples = [
      ex(0, 1, [5, 6], [7, 1], boxes=True, times=True),
      ex(1, 0, [5], [7, 8, 1], boxes=True),                    # no image
      ex(2, 2, [4], [3, 3, 3, 3, 3, 3, 3, 1], times=True),     # targets longer than 6
      ex(3, 3, [5, 6], [7, 1], boxes=True, times=True),        # 3 images > 2 slots
      ex(4, 2, [5, 6, 7, 8, 10, 11, 12, 13], [7, 1], boxes=True),  # prefix 12 > P - 1
      ex(5, 1, [5] * 9, [7, 1]),                               # prefix 11 = P - 1: fits
      ex(6, 2, [5] * 8 + [6] * 3, [7, 1], times=True),         # second image cut (below)
  ]
  # Example 6 has its second image in the middle of the text, where it no longer fits whole.
  examples[6]["inputs"] = np.array([IMAGE_ID] + [5] * 8 + [IMAGE_ID] + [6] * 3, np.int32)
  return examples


@pytest.mark.parametrize("image_shape", [(SIZE, SIZE, 3), (5,)])
def test_prompt_rows_equal_packed_prefixes(image_shape):
  examples = examples_for(image_shape)
  batch = prompts.prompt_batch(examples, **args(image_shape), batch_size=9)
  assert batch["decoder_input_tokens"].shape == (9, PROMPT_LEN)
  assert batch["images"].shape == (9, SLOTS) + image_shape
  assert batch["decoder_boxes"].shape == (9, PROMPT_LEN, 4)
  assert batch["image_times"].shape == (9, SLOTS)
  for key, dtype in (("decoder_input_tokens", np.int32), ("prompt_mask", bool),
                     ("images", np.float32), ("image_mask", bool),
                     ("image_segment_ids", np.int32), ("image_times", np.float32),
                     ("decoder_boxes", np.float32), ("targets", np.int32)):
    assert batch[key].dtype == dtype, key
  cut = 0
  for b, ex in enumerate(examples):
    row = packed_row(ex, image_shape)
    prefix = row["decoder_causal_attention"] == 1   # BOS + expanded inputs, a row prefix
    n = int(prefix.sum())
    np.testing.assert_array_equal(batch["prompt_mask"][b], prefix)
    np.testing.assert_array_equal(batch["decoder_input_tokens"][b, :n],
                                  row["decoder_input_tokens"][:n])
    assert not batch["decoder_input_tokens"][b, n:].any()
    np.testing.assert_array_equal(batch["images"][b], row["images"])
    np.testing.assert_array_equal(batch["image_mask"][b], row["image_mask"])
    np.testing.assert_array_equal(batch["image_segment_ids"][b], row["image_segment_ids"])
    np.testing.assert_array_equal(batch["image_times"][b], row.get("image_times", 0.0))
    np.testing.assert_array_equal(batch["decoder_boxes"][b, :n],
                                  row["decoder_boxes"][:n] if "decoder_boxes" in row else 0.0)
    assert not batch["decoder_boxes"][b, n:].any()
    targets = ex["targets"][:TARGET_LEN]
    np.testing.assert_array_equal(batch["targets"][b, :targets.size], targets)
    assert not batch["targets"][b, targets.size:].any()
    size = prompts.prompt_size(ex, tokens_per_image=T, image_token_id=IMAGE_ID)
    cut += size[0] > PROMPT_LEN or size[1] > SLOTS
  assert cut == 3  # examples 3, 4 and 6
  # Example 6 keeps its first image only: the second would not fit whole in 11 tokens.
  assert batch["image_mask"][6].tolist() == [True, False]
  assert batch["decoder_input_tokens"][6].tolist() == [0, 9, 9] + [5] * 8 + [0]
  # Padding rows: a BOS-only prompt, nothing else.
  for b in (7, 8):
    assert batch["prompt_mask"][b].tolist() == [True] + [False] * (PROMPT_LEN - 1)
    for key in ("decoder_input_tokens", "images", "image_mask", "image_segment_ids",
                "image_times", "decoder_boxes", "targets"):
      assert not batch[key][b].any(), key


def test_worked_example_by_hand():
  a, c = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]
  ex = dict(inputs=np.array([5, IMAGE_ID, 6], np.int32), targets=np.array([7, 1], np.int32),
            images=np.full((1, SIZE, SIZE, 3), 0.5, np.float32),
            input_boxes=np.array([a, [0] * 4, c], np.float32),
            image_times=np.array([0.25], np.float32))
  batch = prompts.prompt_batch([ex], **args(prompt_length=7, max_target_length=3))
  assert batch["decoder_input_tokens"].tolist() == [[0, 5, 9, 9, 6, 0, 0]]
  assert batch["prompt_mask"].tolist() == [[True] * 5 + [False] * 2]
  np.testing.assert_allclose(batch["decoder_boxes"][0],
                             [[0] * 4, a, [0] * 4, [0] * 4, c, [0] * 4, [0] * 4])
  assert batch["image_mask"].tolist() == [[True, False]]
  assert batch["image_segment_ids"].tolist() == [[1, 0]]
  np.testing.assert_allclose(batch["image_times"], [[0.25, 0.0]])
  assert batch["images"][0, 0].min() == 0.5 and not batch["images"][0, 1].any()
  assert batch["targets"].tolist() == [[7, 1, 0]]


def test_optional_features_absent_or_forced():
  plain = example(0, 1, [5], [7, 1])
  batch = prompts.prompt_batch([plain], **args())
  assert "decoder_boxes" not in batch and "image_times" not in batch
  forced = prompts.prompt_batch([plain], **args(with_boxes=True, with_image_times=True))
  assert not forced["decoder_boxes"].any() and not forced["image_times"].any()
  # One example with boxes: the others get zeros, as packing's batch_rows gives them.
  mixed = prompts.prompt_batch([plain, example(1, 0, [5, 6], [1], boxes=True)], **args())
  assert not mixed["decoder_boxes"][0].any() and mixed["decoder_boxes"][1, 1:3].all()
  # Examples without targets (prediction from prompts alone).
  no_targets = {k: v for k, v in plain.items() if k != "targets"}
  assert not prompts.prompt_batch([no_targets], **args())["targets"].any()


def test_errors_name_the_problem():
  too_long = example(4, 2, [5] * 9, [7, 1])
  with pytest.raises(ValueError, match="example 'ex4'.*prompt_length=12"):
    prompts.prompt_batch([too_long], **args(on_too_long="error"))
  with pytest.raises(ValueError, match="on_too_long"):
    prompts.prompt_batch([too_long], **args(on_too_long="drop"))
  with pytest.raises(ValueError, match="prompt_length must be an int >= 1"):
    prompts.prompt_batch([too_long], **args(prompt_length=0))
  with pytest.raises(ValueError, match="batch_size=1 cannot hold 2"):
    prompts.prompt_batch([too_long, too_long], **args(batch_size=1))
  bad = example(1, 1, [5], [7, 1])
  bad["images"] = bad["images"][:0]
  with pytest.raises(ValueError, match="example 'ex1'.*1 image placeholders"):
    prompts.prompt_batch([bad], **args())
