"""The multimodal vocabulary and the structure-token helpers."""
import copy
import math
import os
import re

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from vlpjax.data import special_tokens as st
from vlpjax.data import vocab as vocab_lib

BASE_SIZE = 512
ORDINARY = ["a small red triangle on the left",
            "Yes, a dog. No! A cat? 7/8 = 100%.",
            "ünïcödé 漢字 and < > brackets <time> <loc_x>",
            ""]


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
  """Keeps the extended models out of the real cache while these tests run."""
  old = os.environ.get("VLPJAX_CACHE_DIR")
  os.environ["VLPJAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
  vocab_lib.multimodal_vocabulary.cache_clear()
  yield
  vocab_lib.multimodal_vocabulary.cache_clear()
  if old is None:
    del os.environ["VLPJAX_CACHE_DIR"]
  else:
    os.environ["VLPJAX_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def vocab():
  return vocab_lib.multimodal_vocabulary()


_TOKEN_RE = re.compile(r"<[a-z_]+(?:_\d+)?>")


def _pieces(v, ids):
  return [v.tokenizer.id_to_piece(int(i)) for i in ids]


# --------------------------------------------------------------------------------
# Base model compatibility
# --------------------------------------------------------------------------------


def test_default_vocabulary_unchanged():
  v = vocab_lib.default_vocabulary()
  assert type(v) is seqio.SentencePieceVocabulary  # pylint: disable=unidiomatic-typecheck
  assert v.sentencepiece_model_file == vocab_lib.DEFAULT_SPM_PATH
  assert v.vocab_size == BASE_SIZE and v.extra_ids == 0
  assert vocab_lib.default_vocabulary() is v
  raw = spm.SentencePieceProcessor(model_file=vocab_lib.DEFAULT_SPM_PATH)
  for text in ORDINARY:
    assert list(v.encode(text)) == raw.encode(text)


def test_base_ids_kept(vocab):
  base = vocab_lib.default_vocabulary()
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert [vocab.tokenizer.id_to_piece(i) for i in range(BASE_SIZE)] == [
      base.tokenizer.id_to_piece(i) for i in range(BASE_SIZE)]
  for text in ORDINARY:
    assert list(vocab.encode(text)) == list(base.encode(text))
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == list(base.encode(text))


def test_layout(vocab):
  ids = vocab.special_ids
  assert vocab.vocab_size == ids.vocab_size == BASE_SIZE + 1 + 100 + 500 + 100
  assert ids.image_id() == BASE_SIZE
  assert ids.time_id(0) == BASE_SIZE + 1 and ids.time_id(99) == BASE_SIZE + 100
  assert ids.loc_id(0) == BASE_SIZE + 101 and ids.loc_id(499) == BASE_SIZE + 600
  # T5's sentinel convention: <extra_id_k> is id vocab_size - 1 - k.
  assert ids.sentinel_id(0) == vocab.vocab_size - 1
  assert ids.sentinel_id(99) == ids.sentinel_start
  for k, token in enumerate(vocab.spec.tokens()):
    assert vocab.tokenizer.id_to_piece(BASE_SIZE + k) == token
  expected = {"<image>": ids.image_id(0), "<time_7>": ids.time_id(7),
              "<loc_321>": ids.loc_id(321), "<extra_id_5>": ids.sentinel_id(5)}
  for token, token_id in expected.items():
    assert vocab.tokenizer.piece_to_id(token) == token_id
  with pytest.raises(ValueError, match="time bin 100"):
    ids.time_id(100)


def test_id_predicates_on_arrays(vocab):
  ids = vocab.special_ids
  arr = np.array([5, ids.image_id(), ids.time_id(3), ids.loc_id(7), ids.sentinel_id(0),
                  vocab.vocab_size])
  np.testing.assert_array_equal(ids.is_time_id(arr), [0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(ids.is_loc_id(arr), [0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(ids.is_image_id(arr), [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(ids.is_sentinel_id(arr), [0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(ids.is_special_id(arr), [0, 1, 1, 1, 1, 0])
  assert ids.time_bin(arr)[2] == 3 and ids.loc_bin(arr)[3] == 7
  assert ids.time_bin(ids.time_id(42)) == 42
  tf_mask = ids.is_loc_id(tf.constant(arr))
  assert tf_mask.numpy().tolist() == [False, False, False, True, False, False]
  with pytest.raises(ValueError, match="not a time token id"):
    ids.time_bin(5)


# --------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------

MIXED = ("<image>describe<time_0><time_99>a red circle moves"
         "<loc_0><loc_12><loc_499><loc_250> then <extra_id_0> stops<time_50>")
MIXED_IDS = [("image", 0), ("time", 0), ("time", 99), ("loc", 0), ("loc", 12),
             ("loc", 499), ("loc", 250), ("sentinel", 0), ("time", 50)]


def _expected_special_ids(vocab):
  ids = vocab.special_ids
  get = {"image": ids.image_id, "time": ids.time_id, "loc": ids.loc_id,
         "sentinel": ids.sentinel_id}
  return [get[kind](k) for kind, k in MIXED_IDS]


def test_specials_are_single_ids_python(vocab):
  ids = vocab.encode(MIXED)
  special = [i for i in ids if vocab.special_ids.is_special_id(i)]
  assert special == _expected_special_ids(vocab)
  assert vocab.decode(ids) == MIXED


def test_specials_are_single_ids_tf(vocab):
  python_ids = list(vocab.encode(MIXED))
  assert vocab.encode_tf(tf.constant(MIXED)).numpy().tolist() == python_ids
  assert vocab.decode_tf(tf.constant(python_ids)).numpy().decode() == MIXED

  @tf.function
  def graph_round_trip(text):
    return vocab.decode_tf(vocab.encode_tf(text))

  assert graph_round_trip(tf.constant(MIXED)).numpy().decode() == MIXED


@pytest.mark.parametrize("text", ["x<loc_3>y", "<time_1> <time_2>", " <image> a",
                                  "word<extra_id_7>word", "<time_5>,<time_6>."])
def test_specials_atomic_in_any_context(vocab, text):
  # A space before a token costs a lone "▁" piece, never a split token.
  pieces = _pieces(vocab, vocab.encode(text))
  specials = [p for p in pieces if p in set(vocab.spec.tokens())]
  assert specials == _TOKEN_RE.findall(text)
  assert vocab.decode(vocab.encode(text)) == text.strip()
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == list(vocab.encode(text))


def test_token_like_text_outside_the_spec_is_plain(vocab):
  for text in ["<time_100>", "<loc_500>", "<time_07>", "<image_0>", "<extra_id_100>"]:
    ids = vocab.encode(text)
    assert not any(vocab.special_ids.is_special_id(i) for i in ids), text
    assert vocab.decode(ids) == text
    assert st.parse_special(text, vocab.spec) == [text]


def test_as_seqio_output_feature(vocab):
  features = {"targets": seqio.Feature(vocab, add_eos=True)}
  ds = tf.data.Dataset.from_tensors({"targets": MIXED})
  ds = seqio.preprocessors.tokenize_and_append_eos(ds, features)
  (example,) = list(ds.as_numpy_iterator())
  assert example["targets"].tolist() == list(vocab.encode(MIXED)) + [vocab.eos_id]
  assert vocab.decode(example["targets"].tolist()) == MIXED


def test_deepcopy_equal(vocab):
  # Gin deep-copies vocabularies passed as configurable arguments.
  clone = copy.deepcopy(vocab)
  assert clone == vocab and clone.special_ids == vocab.special_ids
  assert list(clone.encode(MIXED)) == list(vocab.encode(MIXED))


# --------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------


def test_factory_is_cached_and_deterministic(vocab):
  assert vocab_lib.multimodal_vocabulary() is vocab
  path = vocab.sentencepiece_model_file
  assert path.startswith(vocab_lib.cache_dir())
  other = vocab_lib.MultimodalVocabulary()  # A fresh instance, same file and ids.
  assert other.sentencepiece_model_file == path
  assert list(other.encode(MIXED)) == list(vocab.encode(MIXED))
  # The cached file is a plain SentencePiece model.
  raw = spm.SentencePieceProcessor(model_file=path)
  assert raw.encode(MIXED) == list(vocab.encode(MIXED))


def test_different_spec_different_file(vocab, tmp_path):
  small = vocab_lib.multimodal_vocabulary(num_time_bins=10, num_loc_bins=20)
  assert small.sentencepiece_model_file != vocab.sentencepiece_model_file
  assert small.vocab_size == BASE_SIZE + 1 + 10 + 20 + 100
  assert not any(small.special_ids.is_special_id(i) for i in small.encode("<time_50>"))
  assert list(small.encode("<time_9>")) == [small.tokenizer.piece_to_id("▁"),
                                            small.special_ids.time_id(9)]
  local = vocab_lib.MultimodalVocabulary(spec=st.TokenSpec(4, 10, 20, 0),
                                         directory=str(tmp_path))
  assert os.listdir(tmp_path) == [os.path.basename(local.sentencepiece_model_file)]
  assert local.vocab_size == BASE_SIZE + 4 + 10 + 20
  assert [local.tokenizer.id_to_piece(BASE_SIZE + k) for k in range(4)] == [
      "<image_0>", "<image_1>", "<image_2>", "<image_3>"]


def test_damaged_cache_file_is_rewritten(tmp_path):
  spec = st.TokenSpec(1, 10, 10, 2)
  path = vocab_lib.extended_model_file(spec=spec, directory=str(tmp_path))
  good = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(good[:100])
  assert vocab_lib.extended_model_file(spec=spec, directory=str(tmp_path)) == path
  assert open(path, "rb").read() == good
  assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def test_spec_validation_and_clashes(vocab, tmp_path):
  with pytest.raises(ValueError, match="num_time_bins must be 0 or >= 2"):
    st.TokenSpec(num_time_bins=1)
  with pytest.raises(ValueError, match="num_loc_bins must be an int >= 0"):
    st.TokenSpec(num_loc_bins=-3)
  # Extending an already extended model would define every token twice.
  with pytest.raises(ValueError, match="already has the pieces"):
    vocab_lib.extended_model_file(vocab.sentencepiece_model_file, vocab.spec,
                                  str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nope.model"):
    vocab_lib.extended_model_file(str(tmp_path / "nope.model"))


# --------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------


def test_time_bins_by_hand():
  assert st.time_to_bin(0, 60.0) == 0
  assert st.time_to_bin(60.0, 60.0) == 99
  assert st.time_to_token(60.0, 60.0) == "<time_99>"
  assert st.time_to_bin(5.0, 10.0, num_bins=101) == 50
  # Bin width 10 / 100 = 0.1 s: nearest rounds 0.149 down and 0.15 up; floor does not.
  assert st.time_to_bin(0.149, 10.0, num_bins=101) == 1
  assert st.time_to_bin(0.151, 10.0, num_bins=101) == 2
  assert st.time_to_bin(0.199, 10.0, num_bins=101, rounding="floor") == 1
  assert st.token_to_time(99, 60.0) == 60.0
  assert st.token_to_time("<time_50>", 10.0, num_bins=101) == 5.0


def test_time_round_trip_within_half_a_bin():
  rng = np.random.default_rng(0)
  for num_bins in (2, 7, 100):
    duration = 37.5
    half = duration / (num_bins - 1) / 2
    for t in np.concatenate([[0.0, duration], rng.uniform(0, duration, 200)]):
      back = st.token_to_time(st.time_to_token(float(t), duration, num_bins), duration,
                              num_bins)
      assert abs(back - t) <= half + 1e-9


def test_time_errors():
  with pytest.raises(ValueError, match=r"timestamp -0.5 is outside \[0, duration=10"):
    st.time_to_bin(-0.5, 10)
  with pytest.raises(ValueError, match="timestamp 10.5 is outside"):
    st.time_to_token(10.5, 10)
  with pytest.raises(ValueError, match="timestamp nan is NaN"):
    st.time_to_bin(math.nan, 10)
  with pytest.raises(ValueError, match="duration must be finite and > 0, got 0"):
    st.time_to_bin(0, 0)
  with pytest.raises(ValueError, match="num_bins must be an int >= 2"):
    st.time_to_bin(0, 1, num_bins=1)
  with pytest.raises(ValueError, match="rounding must be"):
    st.time_to_bin(0, 1, rounding="up")
  with pytest.raises(ValueError, match="time bin 100 outside"):
    st.token_to_time(100, 1.0)
  with pytest.raises(ValueError, match="is not a <time_k> token"):
    st.token_to_time("<loc_3>", 1.0)
  assert st.time_to_bin(10.5, 10, clip=True) == 99
  assert st.time_to_bin(-3, 10, clip=True) == 0


# --------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------


def test_box_round_trip_and_units():
  width, height = 640, 480
  rng = np.random.default_rng(1)
  for _ in range(100):
    x = np.sort(rng.uniform(0, width, 2))
    y = np.sort(rng.uniform(0, height, 2))
    box = (x[0], y[0], x[1], y[1])
    tokens = st.box_to_loc_tokens(box, width, height)
    assert len(_TOKEN_RE.findall(tokens)) == 4
    back = st.loc_tokens_to_box(tokens, width, height)
    limits = (width, height, width, height)
    for c, b, limit in zip(box, back, limits):
      assert abs(c - b) <= limit / 499 / 2 + 1e-9  # Half a bin.
    normalised = tuple(c / limit for c, limit in zip(box, limits))
    assert st.box_to_loc_tokens(normalised) == tokens
    np.testing.assert_allclose(st.loc_tokens_to_box(tokens),
                               np.array(back) / limits, atol=1e-12)
  full = st.box_to_loc_tokens((0, 0, 640, 480), 640, 480)
  assert full == "<loc_0><loc_0><loc_499><loc_499>"
  assert st.box_to_loc_bins((0.5, 0.25, 0.5, 1.0), num_bins=5) == (2, 1, 2, 4)
  assert st.loc_tokens_to_box([0, 2, 4, 4], 8, 4, num_bins=5) == (0.0, 2.0, 8.0, 4.0)
  assert st.loc_tokens_to_box(" <loc_0> <loc_1><loc_2> <loc_3> ", num_bins=4) == (
      0.0, 1 / 3, 2 / 3, 1.0)


def test_box_errors():
  with pytest.raises(ValueError, match=r"box \(10, 0, 5, 8\) has x1 < x0"):
    st.box_to_loc_tokens((10, 0, 5, 8), 20, 20)
  with pytest.raises(ValueError, match="has x1 < x0 or y1 < y0"):
    st.box_to_loc_tokens((0, 0.5, 1, 0.2))
  with pytest.raises(ValueError, match=r"coordinate 1.5 is outside \[0, 1.0\]"):
    st.box_to_loc_tokens((0, 0, 1.5, 1))
  with pytest.raises(ValueError, match=r"coordinate 30 is outside \[0, 20.0\]"):
    st.box_to_loc_tokens((0, 0, 10, 30), 20, 20)
  with pytest.raises(ValueError, match="has a NaN coordinate"):
    st.box_to_loc_tokens((0, math.nan, 1, 1))
  with pytest.raises(ValueError, match="must have 4 coordinates"):
    st.box_to_loc_tokens((0, 0, 1))
  with pytest.raises(ValueError, match="give both width and height"):
    st.box_to_loc_tokens((0, 0, 1, 1), width=10)
  with pytest.raises(ValueError, match="expected exactly four <loc_k> tokens"):
    st.loc_tokens_to_box("<loc_1><loc_2><loc_3>")
  with pytest.raises(ValueError, match="expected exactly four <loc_k> tokens"):
    st.loc_tokens_to_box("<loc_1>x<loc_2><loc_3><loc_4>")
  with pytest.raises(ValueError, match="loc bin 500 outside"):
    st.loc_tokens_to_box([0, 0, 500, 1])
  assert st.box_to_loc_bins((-2, 0, 25, 20), 20, 20, clip=True) == (0, 0, 499, 499)


# --------------------------------------------------------------------------------
# Parsing decoded text
# --------------------------------------------------------------------------------


def test_parse_decoded_text(vocab):
  text = vocab.decode(vocab.encode(MIXED))
  segments = vocab.parse(text, duration=20.0, width=998, height=499)
  assert segments == [
      st.Image(0), "describe", st.Time(0, 0.0), st.Time(99, 20.0), "a red circle moves",
      st.Box((0, 12, 499, 250), segments[5].coords), " then ", st.Sentinel(0),
      " stops", st.Time(50, 50 / 99 * 20.0)]
  np.testing.assert_allclose(segments[5].coords, (0.0, 12.0, 998.0, 250.0))


def test_parse_boxes_with_spaces_and_leftovers():
  spec = st.TokenSpec(num_loc_bins=5)
  text = "cat <loc_0> <loc_1> <loc_2> <loc_3> <loc_4><loc_4> dog"
  assert st.parse_special(text, spec) == [
      "cat ", st.Box((0, 1, 2, 3), (0.0, 0.25, 0.5, 0.75)), " ", st.Loc(4), st.Loc(4),
      " dog"]
  assert st.parse_special("plain text", spec) == ["plain text"]
  assert st.parse_special("", spec) == []
  several = st.TokenSpec(num_image_tokens=3)
  assert st.parse_special("<image_0><image_2><image>", several) == [
      st.Image(0), st.Image(2), "<image>"]
