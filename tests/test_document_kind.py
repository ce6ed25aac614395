"""The document-layout data kind (vlpjax/data/kinds/document*.py, data_mixtures/documents.py).

Hand-checked examples for every objective, a pure-Python second implementation of the
token streams on random pages, the TF loc bins against `special_tokens`, every bad-record
reason, seeded masking, and TFRecords (pixel and normalised boxes) against the generator.
"""
import io
import os

import numpy as np
from PIL import Image
import pytest
import seqio
import tensorflow as tf

from data_mixtures import documents as document_tasks
from vlpjax.data import documents
from vlpjax.data import records
from vlpjax.data import special_tokens
from vlpjax.data import vocab
from vlpjax.data.kinds import document
from vlpjax.data.kinds import document_objectives as objectives

VOCAB = vocab.multimodal_vocabulary()
IDS = VOCAB.special_ids
FEATURES = document.output_features(VOCAB)
WORDS = ["total", "42", "date", "12/03/24"]
BOXES = [[10, 5, 40, 16], [46, 5, 58, 16], [10, 25, 34, 36], [40, 25, 88, 36]]
SPLITS = {"validation": 6}


def _png(width=100, height=50):
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), (255, 255, 255)).save(buffer, format="PNG")
  return buffer.getvalue()


def _record(**overrides):
  record = dict(id="page-1", image=_png(), width=100, height=50, words=list(WORDS),
                boxes=[float(v) for box in BOXES for v in box],
                question="what is the total?", answer="42")
  record.update(overrides)
  return record


def _tensors(record):
  out = {k: tf.constant(v) for k, v in record.items() if k not in ("words", "boxes")}
  out["words"] = tf.constant(record["words"], tf.string, shape=[len(record["words"])])
  out["boxes"] = tf.constant(record["boxes"], tf.float32, shape=[len(record["boxes"])])
  return out


def _prepare(record, image_size=16, normalized=False):
  ds = tf.data.Dataset.from_tensors(_tensors(record))
  ds = document.validate(ds, normalized_boxes=normalized)
  return document.decode_page(ds, image_size=image_size)


def _one(ds):
  (example,) = list(ds.as_numpy_iterator())
  return example


def _text(ids):
  return VOCAB.decode([int(i) for i in ids])


# --------------------------------------------------------------------------------
# Loc bins
# --------------------------------------------------------------------------------


def test_loc_bins_match_special_tokens_pixel_and_normalised():
  rng = np.random.default_rng(0)
  k = 500
  for width, height in ((100, 50), (998, 333), (1, 7)):
    xs = np.sort(rng.uniform(0, width, size=(64, 2)), axis=1)
    ys = np.sort(rng.uniform(0, height, size=(64, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).astype(np.float32)
    # Exact half-bin coordinates (ties round up) and the page edges.
    half = (np.arange(8) + 0.5) / (k - 1)
    boxes[:8] = np.stack([half * width, half * height, np.full(8, width),
                          np.full(8, height)], 1).astype(np.float32)
    got = document.loc_bins(tf.constant(boxes), width, height, k).numpy()
    want = [special_tokens.box_to_loc_bins(b.tolist(), width, height, k) for b in boxes]
    np.testing.assert_array_equal(got, want)
  normalised = rng.uniform(0, 1, size=(64, 4)).astype(np.float32)
  normalised[:, [0, 2]] = np.sort(normalised[:, [0, 2]], axis=1)  # x0 <= x1
  normalised[:, [1, 3]] = np.sort(normalised[:, [1, 3]], axis=1)  # y0 <= y1
  normalised[:8] = np.array([[0.0, 0.5 / (k - 1), 1.5 / (k - 1), 1.0]], np.float32)
  got = document.loc_bins(tf.constant(normalised), num_bins=k).numpy()
  want = [special_tokens.box_to_loc_bins(b.tolist(), num_bins=k) for b in normalised]
  np.testing.assert_array_equal(got, want)
  # Out-of-range coordinates clamp, as box_to_loc_bins(clip=True) does.
  clipped = document.loc_bins(tf.constant([[-3.0, 2.0, 120.0, 60.0]]), 100, 50, k).numpy()
  assert clipped.tolist() == [list(special_tokens.box_to_loc_bins(
      (-3, 2, 120, 60), 100, 50, k, clip=True))]


def test_loc_round_trip_pixel_and_normalised():
  pixel = np.array(BOXES, np.float32)
  bins_px = document.loc_bins(tf.constant(pixel), 100, 50).numpy()
  bins_norm = document.loc_bins(tf.constant(pixel / [100, 50, 100, 50]), None, None).numpy()
  np.testing.assert_array_equal(bins_px, bins_norm)  # exact fractions here
  for box, bins in zip(pixel, bins_px):
    back = special_tokens.loc_tokens_to_box(
        "".join(special_tokens.loc_token(b) for b in bins), 100, 50)
    # Within half a bin of the original.
    np.testing.assert_array_less(np.abs(np.array(back) - box),
                                 np.array([100, 50, 100, 50]) / 499 / 2 + 1e-9)
  assert bins_px[0].tolist() == [50, 50, 200, 160]  # hand-checked: 10/100*499 = 49.9 -> 50


# --------------------------------------------------------------------------------
# The objectives on the hand-built page (module docstring's worked examples)
# --------------------------------------------------------------------------------

GROUPS, MASKED = [0, 0, 1, 2], [True, False, True]
LOC0 = "<loc_50><loc_50><loc_289><loc_160>"     # union of "total" and "42"
LOC2 = "<loc_200><loc_250><loc_439><loc_359>"   # "12/03/24"; 25/50*499 = 249.5 -> 250
DATE_BOX = np.array([10 / 100, 25 / 50, 34 / 100, 36 / 50], np.float32)


def _worked(builder):
  example = _one(_prepare(_record()))
  made = builder(tf.constant(example["words"]), tf.constant(example["word_boxes"]),
                 tf.constant(GROUPS), tf.constant(MASKED), VOCAB)
  return {k: v.numpy() for k, v in made.items()}


def _boxed_tokens(made):
  """The decoded text of the input tokens that carry a box, and their boxes."""
  at = np.flatnonzero(made["input_boxes"].any(axis=1))
  return _text(made["inputs"][at]), made["input_boxes"][at]


@pytest.mark.parametrize("builder, inputs, targets, boxed", [
    (objectives.joint_text_layout_example,
     "<image> Joint Text-Layout Reconstruction.<extra_id_0> date<extra_id_1>",
     f"<extra_id_0> total 42{LOC0}<extra_id_1> 12/03/24{LOC2}", "date"),
    (objectives.layout_modeling_example,
     "<image> Layout Modeling.<extra_id_0> total 42<extra_id_0> date"
     "<extra_id_1> 12/03/24<extra_id_1>",
     f"<extra_id_0>{LOC0}<extra_id_1>{LOC2}", "date"),
    (objectives.visual_text_recognition_example,
     f"<image> Visual Text Recognition.<extra_id_0>{LOC0} date<extra_id_1>{LOC2}",
     "<extra_id_0> total 42<extra_id_1> 12/03/24", "date"),
])
def test_objectives_hand_checked(builder, inputs, targets, boxed):
  made = _worked(builder)
  assert _text(made["inputs"]) == inputs
  assert _text(made["targets"]) == targets
  assert made["targets"][-1] == VOCAB.eos_id and made["inputs"][0] == IDS.image_id(0)
  assert np.sum(made["inputs"] == IDS.image_id(0)) == 1
  assert made["input_boxes"].shape == (made["inputs"].size, 4)
  text, boxes = _boxed_tokens(made)
  assert text.strip() == boxed
  np.testing.assert_array_equal(boxes, np.tile(DATE_BOX, (len(boxes), 1)))
  # Loc tokens by id: group 0's box is bins (50, 50, 289, 160).
  locs = made["targets"][IDS.is_loc_id(made["targets"])] if "loc" in targets else \
      made["inputs"][IDS.is_loc_id(made["inputs"])]
  assert list(IDS.loc_bin(locs[:4])) == [50, 50, 289, 160]


def test_qa_hand_checked():
  example = _one(objectives.document_qa(_prepare(_record()), FEATURES))
  assert _text(example["inputs"]) == (
      "<image> question: what is the total? context: total 42 date 12/03/24")
  assert _text(example["targets"]) == "42" and example["targets"][-1] == VOCAB.eos_id
  assert example["problem"] == b"" and example["images"].shape == (1, 16, 16, 3)
  # Every word token carries its word's box; the question tokens none.
  head = len([IDS.image_id(0)] + VOCAB.encode("question: what is the total? context:"))
  assert not example["input_boxes"][:head].any()
  pixel = np.array(BOXES, np.float64) / [100, 50, 100, 50]
  want = np.concatenate([np.tile(pixel[i], (len(VOCAB.encode(w)), 1))
                         for i, w in enumerate(WORDS)]).astype(np.float32)
  np.testing.assert_array_equal(example["input_boxes"][head:], want)


# --------------------------------------------------------------------------------
# A pure-Python second implementation, on random pages and maskings
# --------------------------------------------------------------------------------


def _reference(objective, words, boxes_px, size, groups, masked):
  """(inputs, targets, input_boxes) of an objective, built from Python pieces."""
  w, h = size
  frac = [np.array(b, np.float64) / [w, h, w, h] for b in boxes_px]
  ids_of = [VOCAB.encode(x) for x in words]
  members = {}
  for i, g in enumerate(groups):
    members.setdefault(g, []).append(i)
  sentinel = {g: IDS.sentinel_id(k) for k, g in enumerate(g for g in sorted(members)
                                                          if masked[g])}

  def locs(g):
    b = np.array([boxes_px[i] for i in members[g]])
    union = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    return [IDS.loc_id(k) for k in special_tokens.box_to_loc_bins(union, w, h)]

  inputs, boxes, targets = [], [], []
  for g in sorted(members):
    text = [t for i in members[g] for t in ids_of[i]]
    text_boxes = [frac[i] for i in members[g] for _ in ids_of[i]]
    if not masked[g]:
      inputs += text
      boxes += text_boxes
    elif objective == objectives.JOINT:
      inputs += [sentinel[g]]
      boxes += [np.zeros(4)]
      targets += [sentinel[g]] + text + locs(g)
    elif objective == objectives.LAYOUT:
      inputs += [sentinel[g]] + text + [sentinel[g]]
      boxes += [np.zeros(4)] * (len(text) + 2)
      targets += [sentinel[g]] + locs(g)
    else:
      inputs += [sentinel[g]] + locs(g)
      boxes += [np.zeros(4)] * 5
      targets += [sentinel[g]] + text
  head = [IDS.image_id(0)] + VOCAB.encode(objectives.PROMPTS[objective])
  all_boxes = np.array([np.zeros(4)] * len(head) + boxes, np.float32).reshape(-1, 4)
  return head + inputs, targets + [VOCAB.eos_id], all_boxes


@pytest.mark.parametrize("objective", objectives.UDOP_OBJECTIVES)
def test_objectives_match_python_reference(objective):
  rng = np.random.default_rng(1)
  vocabulary_words = WORDS + ["invoice", "paid", "no.", "qty", "7", "eva"]
  for _ in range(6):
    n = int(rng.integers(1, 9))
    words = [vocabulary_words[i] for i in rng.integers(len(vocabulary_words), size=n)]
    x0, y0 = rng.integers(0, 90, size=n), rng.integers(0, 40, size=n)
    boxes = [[int(a), int(b), int(a + rng.integers(1, 11)), int(b + rng.integers(1, 11))]
             for a, b in zip(x0, y0)]
    groups = np.cumsum(np.r_[True, rng.uniform(size=n - 1) < 0.5]) - 1
    masked = rng.uniform(size=groups[-1] + 1) < 0.5
    made = objectives._BUILDERS[objective](  # pylint: disable=protected-access
        tf.constant(words), document.box_fractions(tf.constant(boxes, tf.float32), 100, 50),
        tf.constant(groups, tf.int32), tf.constant(masked), VOCAB)
    inputs, targets, input_boxes = _reference(objective, words, boxes, (100, 50), groups,
                                              masked)
    assert made["inputs"].numpy().tolist() == inputs
    assert made["targets"].numpy().tolist() == targets
    np.testing.assert_array_equal(made["input_boxes"].numpy(), input_boxes)


def test_draw_groups_deterministic_and_valid():
  seen = set()
  for s in range(20):
    a = objectives.draw_groups(12, tf.constant([s, 3]), 3.0, 0.3)
    b = objectives.draw_groups(12, tf.constant([s, 3]), 3.0, 0.3)
    groups, masked = (x.numpy() for x in a)
    np.testing.assert_array_equal(groups, b[0].numpy())
    np.testing.assert_array_equal(masked, b[1].numpy())
    assert groups[0] == 0 and set(np.diff(groups)) <= {0, 1}
    assert masked.size == groups[-1] + 1 and masked.any()
    seen.add((groups.tobytes(), masked.tobytes()))
  assert len(seen) > 15  # different seeds, different masks
  _, masked = objectives.draw_groups(40, tf.constant([0, 0]), 1.0, 1.0, max_masked=5)
  assert masked.numpy().tolist() == [True] * 5 + [False] * 35
  groups, masked = objectives.draw_groups(0, tf.constant([0, 0]))
  assert groups.shape == (0,) and masked.shape == (0,)
  with pytest.raises(ValueError, match="mask_ratio"):
    objectives.draw_groups(3, tf.constant([0, 0]), mask_ratio=0.0)


# --------------------------------------------------------------------------------
# Tasks over the generator: seeds, every word once, input_boxes
# --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tasks():
  document_tasks.register_documents_udop("test_docs_udop", page_size=128, image_size=16,
                                         split_sizes=SPLITS)
  document_tasks.register_documents_qa("test_docs_qa", page_size=128, image_size=16,
                                       split_sizes=SPLITS)
  return [f"test_docs_udop_{o}" for o in objectives.UDOP_OBJECTIVES]


def _examples(task, seed=0, split="validation"):
  ds = seqio.get_mixture_or_task(task).get_dataset(split=split, shuffle=False, seed=seed)
  return list(ds.as_numpy_iterator())


_CACHE = {}


def _generated_examples(task, seed):
  """`_examples` of a task over the generator, computed once per test module."""
  if (task, seed) not in _CACHE:
    _CACHE[task, seed] = _examples(task, seed)
  return _CACHE[task, seed]


def test_registered_names_and_mixture():
  assert {"documents_qa", "documents_udop_joint_text_layout"} <= set(
      seqio.TaskRegistry.names())
  mixture = seqio.get_mixture_or_task("documents_udop")
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  assert rates == {f"documents_udop_{o}": 1.0 for o in objectives.UDOP_OBJECTIVES}


def test_masking_seeded_and_every_word_once(small_tasks):
  joint = small_tasks[0]
  a, b, c = _generated_examples(joint, 1), _examples(joint, seed=1), _examples(joint, seed=2)
  assert [e["inputs"].tolist() for e in a] == [e["inputs"].tolist() for e in b]
  assert [e["inputs"].tolist() for e in a] != [e["inputs"].tolist() for e in c]
  records = list(documents.make_dataset("validation", 128, SPLITS["validation"])
                 .as_numpy_iterator())
  head = 1 + len(VOCAB.encode(objectives.PROMPTS[objectives.JOINT]))
  for example, record in zip(a, records):
    assert example["problem"] == b"" and example["id"] == record["id"]
    # Put each target span back in place of its sentinel: the page's words, each once.
    spans, current = {}, None
    for t in example["targets"][:-1]:
      if IDS.is_sentinel_id(t):
        current = int(t)
        spans[current] = []
      elif not IDS.is_loc_id(t):
        spans[current].append(int(t))
    restored = []
    for t in example["inputs"][head:]:
      restored += spans.pop(int(t)) if IDS.is_sentinel_id(t) else [int(t)]
    assert not spans
    assert restored == [t for w in record["words"] for t in VOCAB.encode(w.decode())]
    n_locs = np.sum(IDS.is_loc_id(example["targets"]))
    assert n_locs == 4 * np.sum(IDS.is_sentinel_id(example["targets"])) > 0


def test_task_input_boxes_align_with_word_tokens(small_tasks):
  for task, objective in zip(small_tasks, objectives.UDOP_OBJECTIVES):
    head = 1 + len(VOCAB.encode(objectives.PROMPTS[objective]))
    for example in _generated_examples(task, 1):
      assert example["inputs"].dtype == np.int32 and example["targets"][-1] == VOCAB.eos_id
      assert example["input_boxes"].shape == (example["inputs"].size, 4)
      assert example["images"].shape == (1, 16, 16, 3) and example["images"].dtype == np.uint8
      assert np.all((example["input_boxes"] >= 0) & (example["input_boxes"] <= 1))
      boxed = example["input_boxes"].any(axis=1)
      word = ~IDS.is_special_id(example["inputs"]) & (np.arange(boxed.size) >= head)
      if objective == objectives.LAYOUT:  # wrapped words hide their boxes
        assert not np.any(boxed & ~word)
      else:  # every word token left in the inputs has its box, nothing else has one
        np.testing.assert_array_equal(boxed, word)
  qa = _generated_examples("test_docs_qa", 1)[0]
  record = next(documents.make_dataset("validation", 128, 6).as_numpy_iterator())
  head = 1 + len(VOCAB.encode(f"question: {record['question'].decode()} context:"))
  fractions = record["boxes"].reshape(-1, 4).astype(np.float64) / 128
  want = np.concatenate([np.tile(fractions[i], (len(VOCAB.encode(w.decode())), 1))
                         for i, w in enumerate(record["words"])]).astype(np.float32)
  np.testing.assert_array_equal(qa["input_boxes"][head:], want)
  assert _text(qa["targets"]) == record["answer"].decode()


# --------------------------------------------------------------------------------
# Bad records: each reason, and the record still runs through
# --------------------------------------------------------------------------------


BAD_PIXEL_RECORDS = [
    (dict(boxes=[10.0, 5.0, 40.0, 16.0, 46.0, 5.0, 120.0, 16.0] + [0.0, 0.0, 1.0, 1.0] * 2),
     "box out of range: word 1 '42' box (x0, y0, x1, y1) = (46, 5, 120, 16) on a "
     "100x50 page"),
    (dict(boxes=[10.0, 5.0, 40.0, 16.0] * 2 + [-0.5, 25.0, 34.0, 36.0, 1.0, 1.0, 2.0, 2.0]),
     "box out of range: word 2 'date' box (x0, y0, x1, y1) = (-0.5, 25, 34, 36)"),
    (dict(boxes=[10.0, 5.0, 40.0, 16.0] * 3 + [40.0, 25.0, 40.0, 36.0]),
     "box out of range: word 3 '12/03/24' box (x0, y0, x1, y1) = (40, 25, 40, 36)"),
    (dict(boxes=[1.0] * 8),
     "boxes length mismatch: 4 words need 16 values in 'boxes' (x0, y0, x1, y1 each), got 8"),
    (dict(words=[], boxes=[]), "empty words: "),
    (dict(image=b"\x89PNG\r\n not really"), "corrupt image: "),
    (dict(image=b""), "missing image: "),
    (dict(width=0), "bad page size: width 0, height 50"),
    (dict(), ""),
]


def _dataset(rows):
  """Records of different lengths in one dataset (lists as ragged columns)."""
  columns = {k: tf.constant([r[k] for r in rows]) for k in rows[0]
             if k not in ("words", "boxes")}
  columns["words"] = records.ragged([r["words"] for r in rows], tf.string)
  columns["boxes"] = records.ragged([r["boxes"] for r in rows], tf.float32)
  return tf.data.Dataset.from_tensor_slices(columns)


def _check_problems(ds, normalized, reasons):
  ds = document.decode_page(document.validate(ds, normalized_boxes=normalized), 16)
  for objective in objectives.UDOP_OBJECTIVES + (objectives.QA,):
    with seqio.utils.map_seed_manager(0):
      examples = list(objectives.udop_objective(ds, FEATURES, objective=objective)
                      .as_numpy_iterator())
    assert len(examples) == len(reasons)
    for example, reason in zip(examples, reasons):
      problem = example["problem"].decode()
      assert problem.startswith(reason) and bool(problem) == bool(reason), (problem, reason)
      # Shapes stay valid: the record can be counted and skipped downstream.
      assert example["input_boxes"].shape == (example["inputs"].size, 4)
      assert example["targets"][-1] == VOCAB.eos_id
      assert example["images"].shape == (1, 16, 16, 3)


def test_bad_records_name_their_problem():
  _check_problems(_dataset([_record(**o) for o, _ in BAD_PIXEL_RECORDS]), False,
                  [reason for _, reason in BAD_PIXEL_RECORDS])


def test_bad_normalised_boxes_name_their_problem():
  rows = [_record(boxes=[0.1, 0.1, 0.2, float("nan")] + [0.1, 0.1, 0.2, 0.2] * 3),
          _record(boxes=[0.1, 0.1, 0.2, 0.2] * 3 + [0.5, 0.5, 1.5, 0.6]),
          _record(boxes=[0.1, 0.1, 0.2, 0.2] * 4, width=0)]  # no page size needed
  _check_problems(_dataset(rows), True, [
      "box out of range: word 0 'total' box (x0, y0, x1, y1) = (0.1, 0.1, 0.2, nan) "
      "in normalised [0, 1] coordinates",
      "box out of range: word 3 '12/03/24' box (x0, y0, x1, y1) = (0.5, 0.5, 1.5, 0.6)", ""])


def test_good_record_and_qa_problems():
  example = _one(_prepare(_record()))
  assert example["problem"] == b""
  assert _one(objectives.document_qa(_prepare(_record(answer=" ")), FEATURES))[
      "problem"].startswith(b"empty answer")
  assert _one(objectives.document_qa(_prepare(_record(question="")), FEATURES))[
      "problem"].startswith(b"empty question")


# --------------------------------------------------------------------------------
# TFRecords
# --------------------------------------------------------------------------------


def _without(path, key, out_path):
  """Rewrites a TFRecord file with `key` deleted from every tf.Example."""
  with tf.io.TFRecordWriter(out_path) as writer:
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
      example = tf.train.Example.FromString(raw)
      del example.features.feature[key]
      writer.write(example.SerializeToString())


def _normalised_copy(path, out_path):
  with tf.io.TFRecordWriter(out_path) as writer:
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
      example = tf.train.Example.FromString(raw)
      feature = example.features.feature
      size = feature["width"].int64_list.value[0]
      boxes = [v / size for v in feature["boxes"].float_list.value]
      feature["boxes"].float_list.value[:] = boxes
      del feature["width"], feature["height"]
      writer.write(example.SerializeToString())


def _same(a, b):
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    for key in ("inputs", "targets", "images", "input_boxes", "id", "problem"):
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_tfrecord_round_trip(small_tasks, tmp_path):
  path = os.path.join(tmp_path, "pages.tfrecord")
  documents.write_tfrecords("validation", path, page_size=128,
                            num_examples=SPLITS["validation"])
  norm_path = os.path.join(tmp_path, "normalised.tfrecord")
  _normalised_copy(path, norm_path)  # 128 px: every x / 128 is exact in float32
  for objective, memory_task, files, normalized in (
      (objectives.QA, "test_docs_qa", path, False),
      (objectives.JOINT, small_tasks[0], path, False),
      (objectives.LAYOUT, small_tasks[1], norm_path, True)):
    document_tasks.register_document_tfrecord_task(
        "test_docs_files", {"validation": files}, objective=objective,
        normalized_boxes=normalized, image_size=16)
    _same(_examples("test_docs_files", seed=1), _generated_examples(memory_task, 1))


def test_tfrecord_without_image_field_is_a_problem(tmp_path):
  path = os.path.join(tmp_path, "pages.tfrecord")
  documents.write_tfrecords("validation", path, page_size=128, num_examples=2)
  _without(path, "image", path + ".noimage")
  document_tasks.register_document_tfrecord_task(
      "test_docs_noimage", {"validation": path + ".noimage"}, image_size=16)
  examples = _examples("test_docs_noimage")
  assert len(examples) == 2
  assert all(e["problem"].startswith(b"missing image: ") for e in examples)
