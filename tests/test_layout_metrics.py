"""Layout metrics: box IoU / accuracy and sentinel-keyed parsing.

Expected values are worked out by hand in the comments.
"""
import numpy as np
import pytest

from vlpjax.evaluators import layout_metrics as lm

# -- boxes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b,want", [
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),     # overlap 1 x 1, union 4 + 4 - 1
    ((0, 0, 4, 4), (1, 1, 2, 2), 1 / 16),    # nested
    ((0, 0, 1, 1), (2, 2, 3, 3), 0.0),       # disjoint
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),       # sharing an edge
    ((0, 0, 2, 1), (0, 0, 2, 2), 0.5),       # half
    ((0.1, 0.2, 0.7, 0.9), (0.1, 0.2, 0.7, 0.9), 1.0),
    ((1, 0, 1, 5), (1, 0, 1, 5), 0.0),       # zero width, even against itself
    ((2, 2, 0, 0), (0, 0, 2, 2), 0.0),       # reversed corners: degenerate
])
def test_box_iou_by_hand(a, b, want):
  assert lm.box_iou(a, b) == pytest.approx(want, abs=1e-12)
  assert lm.box_iou(b, a) == pytest.approx(want, abs=1e-12)


def test_box_iou_matrix_matches_pairs():
  a = [(0, 0, 2, 2), (0, 0, 4, 4), (2, 2, 0, 0)]
  b = [(1, 1, 3, 3), (0, 0, 2, 1)]
  matrix = lm.box_iou_matrix(a, b)
  assert matrix.shape == (3, 2)
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      assert matrix[i, j] == lm.box_iou(x, y)
  assert lm.box_iou_matrix([], b).shape == (0, 2)
  with pytest.raises(ValueError, match="NaN or infinite"):
    lm.box_iou_matrix([(0, 0, float("nan"), 1)], b)
  with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
    lm.box_iou_matrix([(0, 0, 1)], b)


def test_box_accuracy_by_hand():
  gt = [(0, 0, 2, 2)] * 4
  # IoU 1 (hit), 0.5 (hit: >=), 1/4 (miss), no box (miss): 2 / 4.
  pred = [(0, 0, 2, 2), (0, 0, 2, 1), (0, 0, 1, 1), None]
  assert lm.box_accuracy(pred, gt) == 0.5
  assert lm.box_accuracy(pred, gt, threshold=0.6) == 0.25
  assert lm.box_accuracy([None], [(0, 0, 1, 1)]) == 0.0
  with pytest.raises(ValueError, match="one prediction"):
    lm.box_accuracy(pred[:3], gt)


def test_mean_box_baseline():
  # Mean of (0, 0, .5, .5) and (.5, .5, 1, 1) is (.25, .25, .75, .75): IoU 1 with itself and
  # (1/16) / (1/4 + 1/4 - 1/16) = 1/7 with (0, 0, .5, .5): accuracy 1/2.
  box, accuracy = lm.mean_box_baseline([(0, 0, .5, .5), (.5, .5, 1, 1)],
                                       [(.25, .25, .75, .75), (0, 0, .5, .5)])
  assert box == (0.25, 0.25, 0.75, 0.75) and accuracy == 0.5


# -- sentinel-keyed outputs ------------------------------------------------------------------

# The docs/data_documents.md example (K = 500 loc bins, bin k stands for k / 499).
LAYOUT_TARGETS = ("<extra_id_0><loc_50><loc_50><loc_289><loc_160>"
                  "<extra_id_1><loc_200><loc_250><loc_439><loc_359>")
JOINT_TARGETS = ("<extra_id_0> total 42<loc_50><loc_50><loc_289><loc_160>"
                 "<extra_id_1> 12/03/24<loc_200><loc_250><loc_439><loc_359>")
VTR_TARGETS = "<extra_id_0> total 42<extra_id_1> 12/03/24"
DOC_BOXES = {0: (50 / 499, 50 / 499, 289 / 499, 160 / 499),
             1: (200 / 499, 250 / 499, 439 / 499, 359 / 499)}


def _assert_boxes(got, want):
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12)


def test_parse_sentinel_boxes_well_formed():
  _assert_boxes(lm.parse_sentinel_boxes(LAYOUT_TARGETS), DOC_BOXES)
  _assert_boxes(lm.parse_sentinel_boxes(JOINT_TARGETS), DOC_BOXES)  # Text is ignored.
  assert lm.parse_sentinel_boxes(VTR_TARGETS) == {}
  # Another resolution: bin k stands for k / 99.
  _assert_boxes(lm.parse_sentinel_boxes("<extra_id_3><loc_0><loc_9><loc_99><loc_33>",
                                        num_bins=100), {3: (0, 9 / 99, 1, 1 / 3)})


def test_parse_sentinel_boxes_malformed():
  text = ("<loc_1><loc_1><loc_1><loc_1>"                        # before any sentinel: ignored
          "<extra_id_0><loc_1><loc_2><loc_3>"                   # three locs: skipped
          "<extra_id_1> junk <loc_10><loc_20><loc_30><loc_40><loc_50> more"  # first four
          "<extra_id_1><loc_0><loc_0><loc_0><loc_0>"            # repeated: the first wins
          "<extra_id_2><loc_1><loc_2> x <loc_3><loc_4>"         # text breaks the run: skipped
          "<extra_id_4> <loc_5> <loc_6><loc_7>  <loc_8>"        # spaces between locs are fine
          "<extra_id_5><loc_600><loc_1><loc_2><loc_3>"          # <loc_600> is text at K = 500
          "<extra_id_6>")                                       # nothing: skipped
  _assert_boxes(lm.parse_sentinel_boxes(text),
                {1: (10 / 499, 20 / 499, 30 / 499, 40 / 499),
                 4: (5 / 499, 6 / 499, 7 / 499, 8 / 499)})
  # With K = 1000, <loc_600> is a loc token and sentinel 5 has its box.
  boxes = lm.parse_sentinel_boxes(text, num_bins=1000)
  assert sorted(boxes) == [1, 4, 5]
  np.testing.assert_allclose(boxes[5], (600 / 999, 1 / 999, 2 / 999, 3 / 999))
  with pytest.raises(ValueError, match="num_bins"):
    lm.parse_sentinel_boxes(text, num_bins=1)


def test_parse_sentinel_texts():
  assert lm.parse_sentinel_texts(VTR_TARGETS) == {0: "total 42", 1: "12/03/24"}
  assert lm.parse_sentinel_texts(JOINT_TARGETS) == {0: "total 42", 1: "12/03/24"}
  assert lm.parse_sentinel_texts(LAYOUT_TARGETS) == {0: "", 1: ""}
  # Span-denoising targets of a timed transcript keep their time tokens.
  assert lm.parse_sentinel_texts("<extra_id_0> look<time_5><time_9>  a \n dog<extra_id_1> f") \
      == {0: "look<time_5><time_9> a dog", 1: "f"}
  text = ("preface <extra_id_0> first<extra_id_0> second"   # repeated: the first wins
          "<extra_id_2> abc <loc_3> def"                    # a stray loc token ends the text
          "<extra_id_7>")                                   # nothing after it: ""
  assert lm.parse_sentinel_texts(text) == {0: "first", 2: "abc", 7: ""}


def test_parse_token_ids():
  # Needs the real vocabulary (TensorFlow): ids decode to the text they came from.
  from vlpjax.data import vocab  # pylint: disable=g-import-not-at-top
  vocabulary = vocab.multimodal_vocabulary()
  ids = vocabulary.encode(JOINT_TARGETS)
  # Padding is dropped; everything from the first EOS on is cut.
  junk = vocabulary.encode("<extra_id_5><loc_1><loc_2><loc_3><loc_4>")
  padded = np.array([0] + ids + [vocabulary.eos_id] + junk + [0, 0], np.int32)
  _assert_boxes(lm.parse_sentinel_boxes(padded), DOC_BOXES)
  _assert_boxes(lm.parse_sentinel_boxes(list(padded), vocabulary=vocabulary), DOC_BOXES)
  assert lm.parse_sentinel_texts(padded, vocabulary) == {0: "total 42", 1: "12/03/24"}
  with pytest.raises(ValueError, match="1-D sequence of int token ids"):
    lm.parse_sentinel_boxes(padded[None], vocabulary)
