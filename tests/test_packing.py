"""Image-aware prefix-LM conversion and packing (vlpjax/data/packing.py).

Hand-checked cases, agreement with seqio.PrefixLMFeatureConverter on text, and
randomized property tests (fixed seeds) that every token and image survives packing
exactly once and in a consistent place.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from vlpjax.data import packing

IMG = 99  # image placeholder id in these tests
HW = (2, 3, 3)  # tiny images keep the tests fast


def _images(rng, n):
  # Distinct random values, so any mix-up of images is visible bit-exactly.
  return rng.standard_normal((n,) + HW).astype(np.float32)


def _example(inputs, targets, images=None, **extra):
  ex = {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32)}
  if images is not None:
    ex["images"] = images
  ex.update(extra)
  return ex


def _random_example(rng, max_images=4, max_text=8, max_targets=6):
  n_img = int(rng.integers(0, max_images + 1))
  text = rng.integers(1, 60, size=int(rng.integers(0, max_text + 1)))
  inputs = np.insert(text, np.sort(rng.integers(0, text.size + 1, size=n_img)), IMG)
  targets = rng.integers(1, 60, size=int(rng.integers(1, max_targets + 1)))
  return _example(inputs, targets, _images(rng, n_img) if n_img else None)


def _pack(examples, **kw):
  args = dict(row_length=32, max_images_per_row=3, tokens_per_image=4, image_token_id=IMG,
              image_shape=HW)
  args.update(kw)
  return packing.pack(examples, **args)


def _key(tokens, loss_weights, causal, images):
  """Hashable identity of one converted example (all arrays bit-exact)."""
  return (tokens.tobytes(), loss_weights.tobytes(), causal.tobytes(),
          np.ascontiguousarray(images, np.float32).tobytes())


def _segments(row):
  """Splits a packed row back into per-segment keys."""
  seg = row["decoder_segment_ids"]
  keys = []
  for s in range(1, seg.max() + 1):
    at = seg == s
    keys.append(_key(row["decoder_target_tokens"][at], row["decoder_loss_weights"][at],
                     row["decoder_causal_attention"][at],
                     row["images"][row["image_segment_ids"] == s]))
  return keys


# ----------------------------------------------------------------------------------
# Conversion of one example
# ----------------------------------------------------------------------------------


def test_convert_example_hand_checked():
  images = _images(np.random.default_rng(0), 2)
  ex = _example([5, IMG, 6, IMG], [7, 8, 1], images)
  got = packing.convert_example(ex, tokens_per_image=2, image_token_id=IMG)
  expected = {
      "decoder_target_tokens": [5, IMG, IMG, 6, IMG, IMG, 7, 8, 1],
      "decoder_input_tokens": [0, 5, IMG, IMG, 6, IMG, IMG, 7, 8],
      "decoder_loss_weights": [0, 0, 0, 0, 0, 0, 1, 1, 1],
      "decoder_causal_attention": [1, 1, 1, 1, 1, 1, 1, 0, 0],
      "decoder_segment_ids": [1] * 9,
      "decoder_positions": list(range(9)),
  }
  for k, v in expected.items():
    np.testing.assert_array_equal(got[k], np.asarray(v, np.int32), err_msg=k)
    # Loss weights are float32 (per-task weights); 1.0 / 0.0 without one.
    assert got[k].dtype == (np.float32 if k == "decoder_loss_weights" else np.int32), k
  np.testing.assert_array_equal(got["images"], images)


def _seqio_convert(examples, lengths, pack):
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                        "targets": tf.TensorSpec([None], tf.int32)})
  converter = seqio.PrefixLMFeatureConverter(pack=pack)
  return [{k: v.numpy() for k, v in d.items()} for d in converter(ds, lengths)]


def test_matches_seqio_unpacked_text_only():
  ex = _example([9, 4, 6, 11, 1], [3, 9, 1])
  # Exact lengths: with padding, unpacked seqio shifts the last target token into the
  # first pad slot of decoder_input_tokens; our rows keep padding 0 (as packed seqio).
  (want,) = _seqio_convert([ex], {"inputs": 5, "targets": 3}, pack=False)
  got = packing.convert_example(ex, tokens_per_image=4, image_token_id=IMG)
  assert set(want) <= set(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_matches_seqio_packed_text_only():
  # seqio's own docstring example; both fill one row in order.
  examples = [_example([7, 8, 5, 1], [3, 9, 1]), _example([8, 4, 9, 3, 1], [4, 1])]
  (want,) = _seqio_convert(examples, {"inputs": 7, "targets": 8}, pack=True)
  (got,) = _pack(examples, row_length=15)
  for k in packing.TOKEN_FEATURES:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert not got["image_mask"].any()


def test_mismatched_placeholders_named_error():
  rng = np.random.default_rng(1)
  bad = _example([5, IMG, 6], [1], _images(rng, 2), id="ex-7")
  with pytest.raises(ValueError, match=r"'ex-7'.*1 image placeholders.*2 images"):
    packing.convert_example(bad, tokens_per_image=2, image_token_id=IMG)
  with pytest.raises(ValueError, match="'ex-8'"):
    _pack([_example([5, IMG], [1], id=np.array(b"ex-8"))])


def test_other_invalid_examples():
  with pytest.raises(ValueError, match="'e1'.*targets are empty"):
    _pack([_example([5], [], id="e1")])
  with pytest.raises(ValueError, match="targets contain the image token"):
    _pack([_example([5], [IMG])])
  with pytest.raises(ValueError, match="images have shape"):
    _pack([_example([IMG], [1], np.zeros((1, 4, 4, 3), np.float32))])
  with pytest.raises(ValueError, match="on_too_long"):
    _pack([_example([5], [1])], on_too_long="drop")
  with pytest.raises(ValueError, match="cannot hold one image"):
    _pack([_example([5], [1])], row_length=4, tokens_per_image=4)
  # Bad arguments fail when the stream is built, not at its first row.
  with pytest.raises(ValueError, match="image_token_id must not be 0"):
    packing.pack_iter([], row_length=8, max_images_per_row=1, tokens_per_image=2,
                      image_token_id=0, image_shape=HW)


# ----------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------


def test_text_and_image_examples_share_a_row():
  rng = np.random.default_rng(2)
  images = _images(rng, 1)
  examples = [_example([3, 4], [5, 1]), _example([IMG, 6], [7, 1], images),
              _example([8], [9, 1])]
  (row,) = _pack(examples, row_length=20, tokens_per_image=3)
  np.testing.assert_array_equal(
      row["decoder_target_tokens"],
      [3, 4, 5, 1, IMG, IMG, IMG, 6, 7, 1, 8, 9, 1] + [0] * 7)
  np.testing.assert_array_equal(
      row["decoder_input_tokens"],
      [0, 3, 4, 5, 0, IMG, IMG, IMG, 6, 7, 0, 8, 9] + [0] * 7)
  np.testing.assert_array_equal(
      row["decoder_segment_ids"], [1] * 4 + [2] * 6 + [3] * 3 + [0] * 7)
  np.testing.assert_array_equal(
      row["decoder_positions"], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2] + [0] * 7)
  np.testing.assert_array_equal(
      row["decoder_causal_attention"], [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 0] + [0] * 7)
  np.testing.assert_array_equal(
      row["decoder_loss_weights"], [0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 1] + [0] * 7)
  np.testing.assert_array_equal(row["image_mask"], [True, False, False])
  np.testing.assert_array_equal(row["image_segment_ids"], [2, 0, 0])
  np.testing.assert_array_equal(row["images"][0], images[0])
  assert not row["images"][1:].any()
  assert row["images"].dtype == np.float32 and row["images"].shape == (3,) + HW


def test_first_fit_respects_image_capacity():
  rng = np.random.default_rng(3)
  examples = [_example([IMG, IMG], [1], _images(rng, 2)),
              _example([IMG, IMG], [1], _images(rng, 2)),  # images full: new row
              _example([5], [1]),                           # text fits the first row
              _example([IMG], [1], _images(rng, 1))]        # first row has one slot left
  rows = _pack(examples, row_length=32, max_images_per_row=3, tokens_per_image=2)
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["image_segment_ids"], [1, 1, 3])
  np.testing.assert_array_equal(rows[1]["image_segment_ids"], [1, 1, 0])
  assert rows[0]["decoder_segment_ids"].max() == 3


def _check_row_invariants(row, row_length, max_images, t, loss_weights=(1.0,)):
  seg, pos = row["decoder_segment_ids"], row["decoder_positions"]
  tok, inp = row["decoder_target_tokens"], row["decoder_input_tokens"]
  lw, causal = row["decoder_loss_weights"], row["decoder_causal_attention"]
  assert all(row[k].shape == (row_length,) and row[k].dtype == (
      np.float32 if k == "decoder_loss_weights" else np.int32) for k in packing.TOKEN_FEATURES)
  assert row["images"].shape == (max_images,) + HW
  pad = seg == 0
  # Padding is a zero suffix in every token feature.
  assert not any(row[k][pad].any() for k in packing.TOKEN_FEATURES)
  assert np.all(np.diff(pad.astype(int)) >= 0)
  # Segments are 1..S in order, positions restart at 0, input = target shifted in segment.
  n_seg = seg.max()
  for s in range(1, n_seg + 1):
    at = np.flatnonzero(seg == s)
    assert at.size and np.all(np.diff(at) == 1)
    np.testing.assert_array_equal(pos[at], np.arange(at.size))
    np.testing.assert_array_equal(inp[at], np.concatenate([[0], tok[at][:-1]]))
    # Loss exactly on the targets (at the example's weight, one of `loss_weights`): a
    # non-empty suffix without image tokens; the prefix is bidirectional on its
    # n_prefix tokens plus one (seqio).
    n_prefix = int(np.sum(causal[at])) - 1
    weight = lw[at][-1]
    assert weight in loss_weights
    np.testing.assert_array_equal(lw[at], np.where(np.arange(at.size) >= n_prefix, weight, 0))
    np.testing.assert_array_equal(causal[at], np.arange(at.size) < n_prefix + 1)
    assert n_prefix < at.size and not np.any(tok[at][n_prefix:] == IMG)
  # Images: valid slots are a prefix; k-th group of T image tokens <-> k-th valid slot.
  mask, img_seg = row["image_mask"], row["image_segment_ids"]
  n_img = int(mask.sum())
  assert mask[:n_img].all() and not mask[n_img:].any()
  assert not img_seg[n_img:].any() and not row["images"][n_img:].any()
  for feature, shift in ((tok, 0), (inp, 1)):
    where = np.flatnonzero(feature == IMG)
    assert where.size == n_img * t
    for k, group in enumerate(where.reshape(n_img, t)):
      assert np.all(np.diff(group) == 1)
      assert np.all(seg[group] == img_seg[k]) and img_seg[k] > 0
      assert np.all(seg[group - shift] == img_seg[k])
      # Image embeddings sit in the bidirectional prefix, and no loss on image tokens.
      assert np.all(causal[group] == 1) and np.all(lw[group - shift] == 0)


@pytest.mark.parametrize("max_open_rows", [None, 1, 3])
def test_random_packing_keeps_everything_once(max_open_rows):
  rng = np.random.default_rng(4)
  row_length, max_images, t = 32, 3, 4
  examples = [_random_example(rng, max_images=3) for _ in range(300)]
  rows = _pack(examples, row_length=row_length, max_images_per_row=max_images,
               tokens_per_image=t, max_open_rows=max_open_rows)
  want = collections.Counter()
  for ex in examples:
    conv = packing.convert_example(ex, tokens_per_image=t, image_token_id=IMG)
    assert conv["decoder_target_tokens"].size <= row_length  # all fit: no truncation here
    want[_key(conv["decoder_target_tokens"], conv["decoder_loss_weights"],
              conv["decoder_causal_attention"], conv["images"])] += 1
  got = collections.Counter(k for row in rows for k in _segments(row))
  assert got == want
  for row in rows:
    _check_row_invariants(row, row_length, max_images, t)
  # Packing actually packs: close to the bound set by total tokens and images (148 here;
  # with one open row, first-fit degrades to next-fit).
  n_tokens = sum(packing.convert_example(ex, tokens_per_image=t, image_token_id=IMG)[
      "decoder_target_tokens"].size for ex in examples)
  n_images = sum(np.sum(ex["inputs"] == IMG) for ex in examples)
  bound = max(-(-n_tokens // row_length), -(-n_images // max_images))
  assert len(rows) <= bound * (1.1 if max_open_rows is None else 1.3)


def test_stream_packing_is_deterministic_and_lazy():
  rng = np.random.default_rng(5)
  examples = [_random_example(rng) for _ in range(50)]
  kw = dict(row_length=32, max_images_per_row=3, tokens_per_image=4, image_token_id=IMG,
            image_shape=HW, max_open_rows=2)
  a = list(packing.pack_iter(examples, **kw))
  b = list(packing.pack_iter(iter(examples), **kw))
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    for k in ra:
      np.testing.assert_array_equal(ra[k], rb[k])

  def endless():
    while True:
      yield _random_example(rng)
  stream = packing.pack_iter(endless(), **kw)
  assert [next(stream)["decoder_target_tokens"].shape for _ in range(3)] == [(32,)] * 3


def test_batch_rows():
  rng = np.random.default_rng(6)
  rows = _pack([_random_example(rng) for _ in range(40)])
  batch = packing.batch_rows(rows)
  assert batch["decoder_target_tokens"].shape == (len(rows), 32)
  assert batch["images"].shape == (len(rows), 3) + HW
  assert batch["image_mask"].dtype == bool
  np.testing.assert_array_equal(batch["images"][1], rows[1]["images"])


# ----------------------------------------------------------------------------------
# Truncation
# ----------------------------------------------------------------------------------


def _truncate(ex, **kw):
  args = dict(row_length=32, max_images_per_row=3, tokens_per_image=4, image_token_id=IMG,
              image_shape=HW)
  args.update(kw)
  return packing.truncate_example(ex, **args)


def test_too_many_images_drops_trailing_ones():
  images = _images(np.random.default_rng(7), 3)
  ex = _example([5, IMG, 6, IMG, 7, IMG], [1], images, id="many")
  out = _truncate(ex, max_images_per_row=2)
  np.testing.assert_array_equal(out["inputs"], [5, IMG, 6, IMG, 7])
  np.testing.assert_array_equal(out["images"], images[:2])
  assert out["id"] == "many"
  with pytest.raises(ValueError, match="'many'.*3 images.*max_images_per_row=2"):
    _truncate(ex, max_images_per_row=2, on_too_long="error")


def test_too_long_keeps_head_and_whole_images():
  images = _images(np.random.default_rng(8), 2)
  ex = _example([5, IMG, 6, IMG, 7], [1, 2, 3, 4, 5, 6], images, id="long")
  # Prefix costs 1 + 4 + 1 + 4 + 1 = 11 > row_length - 1 = 9: the second image would be
  # cut, so it goes, with everything after it; targets fill the row to 10.
  out = _truncate(ex, row_length=10)
  np.testing.assert_array_equal(out["inputs"], [5, IMG, 6])
  np.testing.assert_array_equal(out["images"], images[:1])
  np.testing.assert_array_equal(out["targets"], [1, 2, 3, 4])
  # Prefix fits: only the targets are cut.
  out = _truncate(ex, row_length=14)
  np.testing.assert_array_equal(out["inputs"], ex["inputs"])
  np.testing.assert_array_equal(out["targets"], [1, 2, 3])
  # Prefix is exactly row_length: one token goes so one target token stays.
  out = _truncate(_example([5, IMG, 6, IMG, 7], [1], images), row_length=11)
  np.testing.assert_array_equal(out["inputs"], [5, IMG, 6, IMG])
  np.testing.assert_array_equal(out["targets"], [1])
  with pytest.raises(ValueError, match="'long'.*17 tokens.*row_length=10"):
    _truncate(ex, row_length=10, on_too_long="error")
  # An example that fits is unchanged.
  out = _truncate(ex, row_length=17, on_too_long="error")
  for k in ("inputs", "targets", "images"):
    np.testing.assert_array_equal(out[k], ex[k])


def test_random_truncation_is_consistent():
  rng = np.random.default_rng(9)
  row_length, max_images, t = 16, 2, 4
  examples = [_random_example(rng, max_images=5, max_text=10, max_targets=10)
              for _ in range(300)]
  n_cut = 0
  for ex in examples:
    out = _truncate(ex, row_length=row_length, max_images_per_row=max_images,
                    tokens_per_image=t)
    n_img = out["images"].shape[0]
    assert n_img <= max_images and np.sum(out["inputs"] == IMG) == n_img
    np.testing.assert_array_equal(out["images"], ex["images"][:n_img] if n_img else
                                  out["images"])
    # inputs: a head of the inputs with images past max_images removed.
    keep = np.flatnonzero(ex["inputs"] == IMG)[max_images:]
    np.testing.assert_array_equal(out["inputs"],
                                  np.delete(ex["inputs"], keep)[:out["inputs"].size])
    np.testing.assert_array_equal(out["targets"], ex["targets"][:out["targets"].size])
    length = out["inputs"].size + n_img * (t - 1) + out["targets"].size
    assert 1 <= out["targets"].size and length <= row_length
    n_cut += length < ex["inputs"].size + np.sum(ex["inputs"] == IMG) * (t - 1) + \
        ex["targets"].size
  assert n_cut > 50  # the rules were exercised
  rows = _pack(examples, row_length=row_length, max_images_per_row=max_images,
               tokens_per_image=t)
  for row in rows:
    _check_row_invariants(row, row_length, max_images, t)
  assert sum(r["decoder_segment_ids"].max() for r in rows) == len(examples)


# ----------------------------------------------------------------------------------
# Attention mask
# ----------------------------------------------------------------------------------


def _brute_force_mask(seg, causal):
  length = seg.size
  mask = np.zeros((length, length), bool)
  for q in range(length):
    for k in range(length):
      mask[q, k] = (seg[q] == seg[k] and seg[q] != 0 and
                    (k <= q or (causal[q] == 1 and causal[k] == 1)))
  return mask


def test_attention_mask_hand_checked():
  seg = np.array([1, 1, 1, 2, 2, 0])
  causal = np.array([1, 1, 0, 1, 0, 0])
  want = np.array([[1, 1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [0, 0, 0, 1, 0, 0],
                   [0, 0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(packing.attention_mask(seg, causal), want)


def test_attention_mask_random_rows_numpy_and_jax():
  rng = np.random.default_rng(10)
  rows = _pack([_random_example(rng) for _ in range(40)], row_length=24)[:6]
  batch = packing.batch_rows(rows)
  seg, causal = batch["decoder_segment_ids"], batch["decoder_causal_attention"]
  want = np.stack([_brute_force_mask(s, c) for s, c in zip(seg, causal)])
  got_np = packing.attention_mask(seg, causal)
  assert isinstance(got_np, np.ndarray) and got_np.dtype == bool
  np.testing.assert_array_equal(got_np, want)
  got_jax = jax.jit(packing.attention_mask)(jnp.asarray(seg), jnp.asarray(causal))
  np.testing.assert_array_equal(np.asarray(got_jax), want)
  np.testing.assert_array_equal(packing.attention_mask(seg[0], causal[0], xp=jnp), want[0])
  # Spelled out: no attention across segments or into padding; causal on targets.
  for b in range(len(rows)):
    s, lw = seg[b], batch["decoder_loss_weights"][b]
    assert not np.any(want[b] & (s[:, None] != s[None, :]))
    assert not want[b][:, s == 0].any() and not want[b][s == 0].any()
    targets = np.flatnonzero(lw == 1)
    assert not np.any(np.triu(want[b], 1)[targets])


# ----------------------------------------------------------------------------------
# Layout boxes (input_boxes -> decoder_boxes)
# ----------------------------------------------------------------------------------


def _boxes(rng, inputs):
  """Distinct per-token boxes; 0 on image placeholders, as document tasks give them."""
  boxes = rng.uniform(0.01, 1.0, size=(len(inputs), 4)).astype(np.float32)
  boxes[np.asarray(inputs) == IMG] = 0
  return boxes


def test_convert_example_boxes_hand_checked():
  a, b = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]
  images = _images(np.random.default_rng(11), 1)
  # The module docstring's example: the placeholder's own row is ignored (zeroed).
  ex = _example([5, IMG, 6], [7, 1], images, input_boxes=[a, [9, 9, 9, 9], b])
  got = packing.convert_example(ex, tokens_per_image=2, image_token_id=IMG)
  np.testing.assert_array_equal(got["decoder_input_tokens"], [0, 5, IMG, IMG, 6, 7])
  np.testing.assert_array_equal(
      got["decoder_boxes"], np.asarray([[0] * 4, a, [0] * 4, [0] * 4, b, [0] * 4], np.float32))
  assert got["decoder_boxes"].dtype == np.float32
  assert "decoder_boxes" not in packing.convert_example(
      _example([5], [1]), tokens_per_image=2, image_token_id=IMG)
  with pytest.raises(ValueError, match=r"'bx'.*input_boxes have shape \[2, 4\].*\[3, 4\]"):
    packing.convert_example(_example([5, 6, 7], [1], input_boxes=np.zeros((2, 4)), id="bx"),
                            tokens_per_image=2, image_token_id=IMG)


def _box_of_token(ex, t):
  """token -> box of each non-image input token (tokens are unique in these tests)."""
  return {int(tok): box for tok, box in zip(ex["inputs"], ex["input_boxes"]) if tok != IMG
          and tok < t}


def _unique_example(rng, next_id, with_boxes, max_images=3):
  """Inputs with unique text ids (so each token's box can be looked up), targets >= 5000."""
  n_text = int(rng.integers(0, 9))
  text = np.arange(next_id, next_id + n_text)
  n_img = int(rng.integers(0, max_images + 1))
  inputs = np.insert(text, np.sort(rng.integers(0, n_text + 1, size=n_img)), IMG)
  targets = rng.integers(5000, 5100, size=int(rng.integers(1, 6)))
  ex = _example(inputs, targets, _images(rng, n_img) if n_img else None)
  if with_boxes:
    ex["input_boxes"] = _boxes(rng, inputs)
  return ex, next_id + n_text


@pytest.mark.parametrize("row_length", [32, 12])  # 12: many examples are truncated
def test_boxes_stay_with_their_tokens_after_packing_and_truncation(row_length):
  rng = np.random.default_rng(12)
  examples, next_id = [], IMG + 1  # text ids above the placeholder's
  for i in range(200):
    ex, next_id = _unique_example(rng, next_id, with_boxes=i % 3 != 0)
    examples.append(ex)
  assert next_id < 5000
  box_of = {}
  for ex in examples:
    if "input_boxes" in ex:
      box_of.update(_box_of_token(ex, 5000))
  rows = _pack(examples, row_length=row_length, max_images_per_row=2, tokens_per_image=3)
  n_with_box = 0
  for row in rows:
    _check_row_invariants(row, row_length, 2, 3)
    # Rows of examples without boxes have none; then no token may want one below.
    boxes = row.get("decoder_boxes", np.zeros((row_length, 4), np.float32))
    inp = row["decoder_input_tokens"]
    assert boxes.shape == (row_length, 4) and boxes.dtype == np.float32
    for pos, tok in enumerate(inp):
      want = box_of.get(int(tok), np.zeros(4, np.float32))
      # Every input token of a boxed example has its own box, everything else 0
      # (padding, BOS, image runs, targets, examples without boxes).
      np.testing.assert_array_equal(boxes[pos], want, err_msg=f"position {pos}")
      n_with_box += int(tok) in box_of
  assert n_with_box > 100  # the check saw many boxed tokens


def test_truncation_cuts_boxes_with_their_tokens():
  images = _images(np.random.default_rng(13), 3)
  inputs = [5, IMG, 6, IMG, 7, IMG]
  boxes = np.arange(24, dtype=np.float32).reshape(6, 4)
  ex = _example(inputs, [1, 2], images, input_boxes=boxes)
  out = _truncate(ex, max_images_per_row=2)  # the last placeholder and its row go
  np.testing.assert_array_equal(out["input_boxes"], boxes[:5])
  out = _truncate(ex, row_length=8, max_images_per_row=3)  # prefix cut to [5, IMG, 6]
  np.testing.assert_array_equal(out["inputs"], [5, IMG, 6])
  np.testing.assert_array_equal(out["input_boxes"], boxes[:3])
  assert "input_boxes" not in _truncate(_example([5], [1]))


def test_rows_and_batches_with_and_without_boxes():
  rng = np.random.default_rng(14)
  plain = _example([3, 4], [5, 1])
  boxed = _example([6, 7], [8, 1], input_boxes=_boxes(rng, [6, 7]))
  row_plain, = _pack([plain], row_length=8)
  assert "decoder_boxes" not in row_plain
  row_always, = _pack([plain], row_length=8, with_boxes=True)
  np.testing.assert_array_equal(row_always["decoder_boxes"], np.zeros((8, 4)))
  row_never, = _pack([boxed], row_length=8, with_boxes=False)
  assert "decoder_boxes" not in row_never
  row_mixed, = _pack([plain, boxed], row_length=8)
  np.testing.assert_array_equal(row_mixed["decoder_boxes"][:4], np.zeros((4, 4)))
  np.testing.assert_array_equal(row_mixed["decoder_boxes"][5:7], boxed["input_boxes"])
  batch = packing.batch_rows([row_plain, row_mixed])
  assert batch["decoder_boxes"].shape == (2, 8, 4)
  np.testing.assert_array_equal(batch["decoder_boxes"][0], np.zeros((8, 4)))
  np.testing.assert_array_equal(batch["decoder_boxes"][1], row_mixed["decoder_boxes"])


# ----------------------------------------------------------------------------------
# Per-example loss weights and image times (video kinds)
# ----------------------------------------------------------------------------------


def test_convert_example_loss_weight_and_times_hand_checked():
  images = _images(np.random.default_rng(15), 1)
  # The module docstring's example with loss_weight 0.5.
  ex = _example([5, IMG, 6], [7, 1], images, loss_weight=0.5, image_times=[0.25])
  got = packing.convert_example(ex, tokens_per_image=2, image_token_id=IMG)
  np.testing.assert_array_equal(got["decoder_loss_weights"],
                                np.float32([0, 0, 0, 0, 0.5, 0.5]))
  assert got["decoder_loss_weights"].dtype == np.float32
  np.testing.assert_array_equal(got["image_times"], np.float32([0.25]))
  plain = packing.convert_example(_example([5], [7, 1]), tokens_per_image=2,
                                  image_token_id=IMG)
  np.testing.assert_array_equal(plain["decoder_loss_weights"], np.float32([0, 1, 1]))
  assert "image_times" not in plain
  zero = packing.convert_example(_example([5], [7, 1], loss_weight=np.float32(0)),
                                 tokens_per_image=2, image_token_id=IMG)
  assert not zero["decoder_loss_weights"].any()


@pytest.mark.parametrize("extra, message", [
    (dict(loss_weight=-0.5), r"'w'.*loss_weight is -0.5"),
    (dict(loss_weight=np.nan), r"'w'.*loss_weight is nan"),
    (dict(loss_weight=[1.0, 2.0]), r"'w'.*loss_weight must be a scalar"),
    (dict(image_times=[0.5]), r"'w'.*image_times have shape \[1\], expected \[2\]"),
    (dict(image_times=[0.5, 1.5]), r"'w'.*image_times\[1\] is 1.5"),
    (dict(image_times=[np.inf, 0.5]), r"'w'.*image_times\[0\] is inf"),
    (dict(image_times=[0.5, -0.1]), r"'w'.*image_times\[1\] is -0.1"),
])
def test_bad_loss_weight_and_times_named(extra, message):
  ex = _example([IMG, IMG], [1], _images(np.random.default_rng(16), 2), id="w", **extra)
  with pytest.raises(ValueError, match=message):
    packing.convert_example(ex, tokens_per_image=2, image_token_id=IMG)
  with pytest.raises(ValueError, match=message):
    _pack([ex])


def test_truncation_drops_times_with_their_images():
  images = _images(np.random.default_rng(17), 3)
  times = np.float32([0.1, 0.5, 0.9])
  ex = _example([5, IMG, 6, IMG, 7, IMG], [1, 2], images, image_times=times,
                loss_weight=0.25)
  out = _truncate(ex, max_images_per_row=2)
  np.testing.assert_array_equal(out["image_times"], times[:2])
  assert out["loss_weight"] == 0.25
  out = _truncate(ex, row_length=8, max_images_per_row=3)  # prefix cut to [5, IMG, 6]
  np.testing.assert_array_equal(out["images"], images[:1])
  np.testing.assert_array_equal(out["image_times"], times[:1])
  assert "image_times" not in _truncate(_example([5], [1]))
  assert "loss_weight" not in _truncate(_example([5], [1]))


@pytest.mark.parametrize("row_length", [32, 12])  # 12: many examples are truncated
def test_times_and_weights_stay_with_their_examples_after_packing(row_length):
  rng = np.random.default_rng(18)
  examples = []
  for i in range(200):
    ex = _random_example(rng, max_images=3)
    n_img = int(np.sum(ex["inputs"] == IMG))
    if i % 3:  # A third without times, so rows mix both.
      ex["image_times"] = rng.uniform(0, 1, n_img).astype(np.float32)
    if i % 4:
      ex["loss_weight"] = float(rng.choice([0.0, 0.5, 2.0]))
    examples.append(ex)
  # Images are random, so an image's first value identifies it (and its time).
  time_of = {float(img.flat[0]): t for ex in examples if "image_times" in ex
             for img, t in zip(ex.get("images", ()), ex["image_times"])}
  rows = _pack(examples, row_length=row_length, max_images_per_row=3, tokens_per_image=4)
  n_timed = 0
  for row in rows:
    _check_row_invariants(row, row_length, 3, 4, loss_weights=(0.0, 0.5, 1.0, 2.0))
    times = row.get("image_times", np.zeros(3, np.float32))
    assert times.shape == (3,) and times.dtype == np.float32
    for slot in range(3):
      want = time_of.get(float(row["images"][slot].flat[0]), 0.0) if row["image_mask"][
          slot] else 0.0
      assert times[slot] == np.float32(want), slot
      n_timed += row["image_mask"][slot] and want != 0
  assert n_timed > 100
  # Each segment's targets weigh its example's loss_weight (examples are packed in
  # stream order within a row, so segments are matched by their target tokens).
  weights = collections.Counter()
  for row in rows:
    seg, lw = row["decoder_segment_ids"], row["decoder_loss_weights"]
    for s in range(1, seg.max() + 1):
      target = lw[seg == s][lw[seg == s] > 0]
      assert np.unique(target).size <= 1
      weights[float(target[0]) if target.size else 0.0] += 1
  want = collections.Counter(float(ex.get("loss_weight", 1.0)) for ex in examples)
  assert weights == want


def test_rows_and_batches_with_and_without_times():
  images = _images(np.random.default_rng(19), 2)
  plain = _example([IMG, 3], [5, 1], images[:1])
  timed = _example([IMG, 6], [8, 1], images[1:], image_times=[0.75])
  row_plain, = _pack([plain], row_length=16)
  assert "image_times" not in row_plain
  row_always, = _pack([plain], row_length=16, with_image_times=True)
  np.testing.assert_array_equal(row_always["image_times"], np.zeros(3))
  row_never, = _pack([timed], row_length=16, with_image_times=False)
  assert "image_times" not in row_never
  row_mixed, = _pack([plain, timed], row_length=16, tokens_per_image=2)
  np.testing.assert_array_equal(row_mixed["image_times"], np.float32([0, 0.75, 0]))
  np.testing.assert_array_equal(row_mixed["image_segment_ids"], [1, 2, 0])
  batch = packing.batch_rows([row_plain, row_mixed])
  assert batch["image_times"].shape == (2, 3) and batch["image_times"].dtype == np.float32
  np.testing.assert_array_equal(batch["image_times"][0], np.zeros(3))
  np.testing.assert_array_equal(batch["image_times"][1], row_mixed["image_times"])


def test_feature_vectors_pack_as_images():
  """Precomputed frame features [n, D] travel like pictures when image_shape = (D,)."""
  rng = np.random.default_rng(20)
  feats = [rng.standard_normal((n, 5)).astype(np.float32) for n in (2, 1)]
  examples = [_example([IMG, IMG, 4], [5, 1], feats[0], image_times=[0.25, 0.75]),
              _example([IMG], [6, 1], feats[1], image_times=[0.5]),
              _example([7], [1])]
  (row,) = _pack(examples, row_length=32, max_images_per_row=4, tokens_per_image=1,
                 image_shape=(5,))
  assert row["images"].shape == (4, 5)
  np.testing.assert_array_equal(row["images"][:3], np.concatenate(feats))
  np.testing.assert_array_equal(row["image_times"], np.float32([0.25, 0.75, 0.5, 0]))
  np.testing.assert_array_equal(row["image_segment_ids"], [1, 1, 2, 0])
  with pytest.raises(ValueError, match=r"images have shape \[2, 5\], expected \[n, 6\]"):
    _pack(examples[:1], image_shape=(6,))
  with pytest.raises(ValueError, match=r"images have shape \[2, 5\], expected \[n, 2, 3, 3\]"):
    _pack(examples[:1])
  got = packing.convert_example(examples[1], tokens_per_image=1, image_token_id=IMG,
                                image_shape=(5,))
  np.testing.assert_array_equal(got["images"], feats[1])
