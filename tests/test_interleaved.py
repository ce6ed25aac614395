"""The interleaved image-text kind: token streams, truncation, bad records, tasks, packing."""
import collections
import io

import numpy as np
from PIL import Image
import pytest
import seqio
import tensorflow as tf

from data_mixtures import interleaved as mixtures
from vlpjax.data import bad_records
from vlpjax.data import packing
from vlpjax.data import records
from vlpjax.data import stories
from vlpjax.data.kinds import interleaved
from vlpjax.data.vocab import multimodal_vocabulary

S = 8  # Image size of the hand-made records.
STORY_SIZE = 32
SPLITS = {"train": 6, "validation": 2}
RED, GREEN, BLUE = (200, 10, 10), (10, 200, 10), (10, 10, 200)


def _vocab():
  return multimodal_vocabulary()


def _image_id():
  return _vocab().special_ids.image_id(0)


def _png(colour, width=12, height=6) -> bytes:
  """A solid-colour PNG (lossless, and any resize of it keeps the colour)."""
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
  return buffer.getvalue()


def _solid(colour, size=S):
  return np.broadcast_to(np.array(colour, np.uint8), (size, size, 3))


def _run(records_, steps):
  """Applies preprocessors `steps` (functions of ds) to in-memory records, in one pass."""
  # An empty image_labels list is what an absent one parses to.
  datasets = [tf.data.Dataset.from_tensors({
      "id": tf.constant(record.get("id", "r")),
      **{k: tf.constant(record.get(k, []), dtype) for k, dtype in
         (("texts", tf.string), ("images", tf.string), ("image_labels", tf.int64))}})
              for record in records_]
  ds = datasets[0]
  for other in datasets[1:]:
    ds = ds.concatenate(other)  # Lists of other lengths: the spec relaxes to [None].
  for step in steps:
    ds = step(ds)
  return list(ds.as_numpy_iterator())


def _document(records_, image_size=S, validate=True, **kwargs):
  features = interleaved.output_features()
  steps = [interleaved.validate_document] if validate else []
  steps.append(lambda ds: interleaved.tokenize_document(ds, features, image_size, **kwargs))
  return _run(records_, steps)


def _text(records_, **kwargs):
  features = interleaved.output_features()
  return _run(records_, [lambda ds: interleaved.tokenize_text(ds, features, S, **kwargs)])


def _assert_contract(ex):
  """Shapes hold even on bad records: one image per placeholder, targets end in EOS."""
  assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32
  assert ex["images"].dtype == np.uint8 and ex["images"].shape[1:] == (S, S, 3)
  assert int(np.sum(ex["inputs"] == _image_id())) == ex["images"].shape[0]
  assert not np.any(ex["targets"] == _image_id())
  assert ex["targets"][-1] == _vocab().eos_id


def _enc(text):
  return _vocab().encode(text)


# A story with three images, red, green, blue, each after a sentence.
T0, T1, T2, T3 = "a red circle.", "then it turns green.", "now it is blue.", "the end."
STORY = dict(id="hand/0", texts=[T0, "", T1, "", T2, "", T3],
             images=[b"", _png(RED), b"", _png(GREEN), b"", _png(BLUE), b""],
             image_labels=[-1, 0, -1, 1, -1, 2, -1])


def test_placeholders_in_place_and_images_in_order():
  (ex,) = _document([STORY])
  img = _image_id()
  np.testing.assert_array_equal(
      ex["inputs"], _enc(T0) + [img] + _enc(T1) + [img] + _enc(T2) + [img])
  np.testing.assert_array_equal(ex["targets"], _enc(T3) + [1])
  # 12x6 PNGs come out S x S, in placeholder order, pixels intact.
  np.testing.assert_array_equal(ex["images"], [_solid(RED), _solid(GREEN), _solid(BLUE)])
  np.testing.assert_array_equal(ex["image_labels"], [0, 1, 2])
  assert ex["problem"] == b"" and ex["id"] == b"hand/0"
  assert "texts" not in ex


def test_trailing_images_dropped_by_default_and_kept_on_request():
  record = dict(texts=[T0, "", T1, ""], images=[b"", _png(RED), b"", _png(GREEN)])
  img = _image_id()
  (drop,) = _document([record])
  np.testing.assert_array_equal(drop["inputs"], _enc(T0) + [img])
  np.testing.assert_array_equal(drop["targets"], _enc(T1) + [1])
  np.testing.assert_array_equal(drop["images"], [_solid(RED)])
  (keep,) = _document([record], trailing_images="keep")
  np.testing.assert_array_equal(keep["inputs"], _enc(T0) + [img] + _enc(T1) + [img])
  np.testing.assert_array_equal(keep["targets"], [1])
  np.testing.assert_array_equal(keep["images"], [_solid(RED), _solid(GREEN)])


@pytest.mark.parametrize("max_images,inputs,targets,colours", [
    (1, [T0, None], [T1], [RED]),
    (2, [T0, None, T1, None], [T2], [RED, GREEN]),
    (3, [T0, None, T1, None, T2, None], [T3], [RED, GREEN, BLUE]),
])
def test_max_images_keeps_stream_before_the_next_image(max_images, inputs, targets, colours):
  (ex,) = _document([STORY], max_images=max_images)
  expected = [t for x in inputs for t in ([_image_id()] if x is None else _enc(x))]
  np.testing.assert_array_equal(ex["inputs"], expected)
  np.testing.assert_array_equal(ex["targets"], [t for x in targets for t in _enc(x)] + [1])
  np.testing.assert_array_equal(ex["images"], [_solid(c) for c in colours])
  _assert_contract(ex)


def _reference(record, max_images, max_tokens, trailing):
  """Steps 1-4 of the kind's docstring in plain Python: (inputs, targets, n_images)."""
  img, stream = _image_id(), []
  for text, image in zip(record["texts"], record["images"]):
    stream += [img] if image else _enc(text)
  where = [i for i, t in enumerate(stream) if t == img]
  if max_images is not None and len(where) > max_images:
    stream = stream[:where[max_images]]
  if max_tokens is not None:
    stream = stream[:max_tokens - 1]
  while trailing == "drop" and stream and stream[-1] == img:
    stream.pop()
  split = max([i + 1 for i, t in enumerate(stream) if t == img], default=0)
  return stream[:split], stream[split:] + [1], stream.count(img)


@pytest.mark.parametrize("max_images,max_tokens,trailing", [
    (None, None, "drop"), (None, None, "keep"), (1, None, "drop"), (2, 30, "keep"),
    (3, 12, "drop"), (None, 5, "keep"), (4, 2, "drop")])
def test_truncation_matches_python_reference_on_stories(max_images, max_tokens, trailing):
  # The generator's own cache: generated once for every parameter set.
  story_records = records.generated(stories.generate_example, "train", 5, S)
  full = _document(story_records, trailing_images="keep", max_images=None)
  got = _document(story_records, max_images=max_images, max_tokens=max_tokens,
                  trailing_images=trailing)
  for record, ex, whole in zip(story_records, got, full):
    inputs, targets, n_images = _reference(record, max_images, max_tokens, trailing)
    np.testing.assert_array_equal(ex["inputs"], inputs)
    np.testing.assert_array_equal(ex["targets"], targets)
    # The kept images are the document's first ones, pixel for pixel.
    np.testing.assert_array_equal(ex["images"], whole["images"][:n_images])
    if max_tokens is not None:
      assert ex["inputs"].size + ex["targets"].size <= max_tokens
    _assert_contract(ex)
    assert ex["problem"] == b""


def test_text_only_yields_texts_and_no_images():
  (ex,) = _text([STORY])
  assert ex["inputs"].shape == (0,) and ex["images"].shape == (0, S, S, 3)
  np.testing.assert_array_equal(ex["targets"], _enc(T0) + _enc(T1) + _enc(T2) + _enc(T3) + [1])
  (cut,) = _text([STORY], max_tokens=4)
  np.testing.assert_array_equal(cut["targets"], _enc(T0)[:3] + [1])


def test_text_as_document_for_plain_text_records():
  ds = tf.data.Dataset.from_tensors({"id": "p/0", "text": T2})
  ds = interleaved.tokenize_text(interleaved.text_as_document(ds),
                                 interleaved.output_features(), S)
  (ex,) = list(ds.as_numpy_iterator())
  np.testing.assert_array_equal(ex["targets"], _enc(T2) + [1])
  assert ex["problem"] == b"" and "text" not in ex


BAD = [
    ("unequal lists: texts 2, images 3",
     dict(texts=["a", ""], images=[b"", _png(RED), b""])),
    ("unequal lists: texts 2, images 2, image_labels 3",
     dict(texts=["a", ""], images=[b"", _png(RED)], image_labels=[-1, 0, 0])),
    ("both text and image: position 0", dict(texts=["a", "b"], images=[_png(RED), b""])),
    ("neither text nor image: position 1",
     dict(texts=["a", "", ""], images=[b"", b"", _png(RED)])),
    ("corrupt image: image 1 (position 3)",
     dict(texts=["a", "", "b", "", "c"], images=[b"", _png(RED), b"", b"not an image", b""])),
    ("image token in text: position 0", dict(texts=["a <image> b", ""], images=[b"", _png(RED)])),
    ("no image", dict(texts=["a", "b"], images=[b"", b""])),
    ("no text", dict(texts=["", ""], images=[_png(RED), _png(GREEN)])),
    ("empty document", dict(texts=[], images=[])),
]


@pytest.fixture(scope="module")
def bad_outputs():
  return _document([record for _, record in BAD])  # One pipeline for all.


@pytest.mark.parametrize("index", range(len(BAD)), ids=[r.split(":")[0] for r, _ in BAD])
def test_bad_records_get_their_problem_and_keep_valid_shapes(index, bad_outputs):
  reason, ex = BAD[index][0], bad_outputs[index]
  assert ex["problem"].decode().startswith(reason), ex["problem"]
  _assert_contract(ex)


def test_corrupt_image_beyond_max_images_is_not_decoded():
  record = dict(texts=["a", "", "b", "", "c"], images=[b"", _png(RED), b"", b"junk", b""])
  (ex,) = _document([record], max_images=1)
  assert ex["problem"] == b""
  np.testing.assert_array_equal(ex["images"], [_solid(RED)])


def test_text_only_problems():
  (ex,) = _text([dict(texts=["", ""], images=[_png(RED), _png(GREEN)])])
  assert ex["problem"] == b"no text: nothing to predict"
  (ex,) = _text([dict(texts=["x <image>"], images=[b""])])
  assert ex["problem"].decode().startswith("image token in text: position 0")
  assert not np.any(ex["targets"] == _image_id())


def test_pad_images_fixed_size_variant():
  (ex,) = _document([STORY], max_images=2)
  ds = interleaved.pad_images(tf.data.Dataset.from_tensors(ex), max_images=4)
  (fixed,) = list(ds.as_numpy_iterator())
  assert fixed["images"].shape == (4, S, S, 3)
  np.testing.assert_array_equal(fixed["image_mask"], [True, True, False, False])
  np.testing.assert_array_equal(fixed["images"][:2], ex["images"])
  assert not fixed["images"][2:].any()
  np.testing.assert_array_equal(fixed["image_labels"], [0, 1, -1, -1])
  (over,) = list(interleaved.pad_images(tf.data.Dataset.from_tensors(ex), 1)
                 .as_numpy_iterator())
  assert over["problem"] == b"too many images: 2 > max_images 1"
  assert over["images"].shape == (1, S, S, 3)


def test_bad_arguments_fail_at_build_time():
  features = interleaved.output_features()
  ds = tf.data.Dataset.from_tensors({"texts": ["a"], "images": [b""]})
  with pytest.raises(ValueError, match="max_images"):
    interleaved.tokenize_document(ds, features, S, max_images=0)
  with pytest.raises(ValueError, match="max_tokens"):
    interleaved.tokenize_document(ds, features, S, max_tokens=1)
  with pytest.raises(ValueError, match="trailing_images"):
    interleaved.tokenize_document(ds, features, S, trailing_images="first")


# --------------------------------------------------------------------------------
# Registered tasks
# --------------------------------------------------------------------------------


def _examples(task, split="train", **kwargs):
  kwargs.setdefault("shuffle", False)
  ds = seqio.get_mixture_or_task(task).get_dataset(None, split=split, **kwargs)
  return list(ds.as_numpy_iterator())


@pytest.fixture(scope="module")
def story_tasks():
  mixtures.register_stories_interleaved_task("test_il_stories", image_size=STORY_SIZE,
                                             split_sizes=SPLITS)
  mixtures.register_stories_text_task("test_il_text", image_size=STORY_SIZE,
                                      split_sizes=SPLITS)
  return "test_il_stories", "test_il_text"


def test_default_tasks_registered_on_import():
  for name in (mixtures.STORIES_INTERLEAVED, mixtures.STORIES_TEXT):
    task = seqio.get_mixture_or_task(name)
    assert set(task.splits) == set(stories.SPLIT_SIZES)
    assert task.num_input_examples("validation") == stories.SPLIT_SIZES["validation"]


def test_story_tasks_are_clean_and_text_task_matches(story_tasks):
  images_task, text_task = story_tasks
  with_images, texts = _examples(images_task), _examples(text_task)
  assert [e["id"] for e in with_images] == [e["id"] for e in texts]
  for ex, text_ex, i in zip(with_images, texts, range(SPLITS["train"])):
    assert ex["problem"] == b"" and text_ex["problem"] == b""
    assert ex["images"].shape[1:] == (STORY_SIZE, STORY_SIZE, 3) and ex["images"].shape[0] > 0
    assert text_ex["images"].shape == (0, STORY_SIZE, STORY_SIZE, 3)
    record = stories.generate_example("train", i, STORY_SIZE)
    want = [t for text in record["texts"] if text for t in _enc(text)] + [1]
    np.testing.assert_array_equal(text_ex["targets"], want)


def test_tfrecord_round_trip_matches_in_memory_task(tmp_path, story_tasks):
  path = str(tmp_path / "stories.tfrecord")
  stories.write_tfrecords("train", path, image_size=STORY_SIZE,
                          num_examples=SPLITS["train"])
  mixtures.register_interleaved_tfrecord_task("test_il_tfrecord", {"train": path},
                                              image_size=STORY_SIZE)
  from_files, in_memory = _examples("test_il_tfrecord"), _examples(story_tasks[0])
  assert len(from_files) == len(in_memory) == SPLITS["train"]
  for a, b in zip(from_files, in_memory):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _write(path, examples):
  with tf.io.TFRecordWriter(path) as writer:
    for features in examples:
      writer.write(tf.train.Example(features=tf.train.Features(
          feature=features)).SerializeToString())


def test_tfrecord_without_a_list_is_a_bad_record(tmp_path):
  path = str(tmp_path / "missing.tfrecord")
  _write(path, [
      {"id": records.bytes_feature(["no-images"]), "texts": records.bytes_feature(["a", ""])},
      {"id": records.bytes_feature(["no-texts"]),
       "images": records.bytes_feature([_png(RED)])},
  ])
  mixtures.register_interleaved_tfrecord_task("test_il_missing", {"train": path},
                                              image_size=S)
  got = _examples("test_il_missing")
  assert [e["problem"].decode().split(":")[0] for e in got] == ["missing images",
                                                                "missing texts"]
  for ex in got:
    _assert_contract(ex)
  ds = seqio.get_mixture_or_task("test_il_missing").get_dataset(None, split="train",
                                                                 shuffle=False)
  ds = bad_records.apply_policy(ds, policy="error", task="test_il_missing", split="train")
  with pytest.raises(Exception, match="record id 'no-images': missing images"):
    list(ds.as_numpy_iterator())


def test_tfrecord_task_text_only_and_fixed_images(tmp_path):
  path = str(tmp_path / "stories.tfrecord")
  stories.write_tfrecords("train", path, image_size=S, num_examples=3)
  mixtures.register_interleaved_tfrecord_task("test_il_tfr_text", {"train": path},
                                              image_size=S, text_only=True)
  mixtures.register_interleaved_tfrecord_task("test_il_tfr_fixed", {"train": path},
                                              image_size=S, max_images=5, fixed_images=True)
  for ex in _examples("test_il_tfr_text"):
    assert ex["images"].shape == (0, S, S, 3) and ex["inputs"].size == 0
  for ex in _examples("test_il_tfr_fixed"):
    n = int(np.sum(ex["inputs"] == _image_id()))
    assert ex["images"].shape == (5, S, S, 3) and ex["image_mask"].sum() == n > 0
    assert not ex["images"][n:].any()


def test_fixed_seed_gives_the_same_stream(story_tasks):
  def run(seed):
    got = _examples(story_tasks[0], shuffle=True, seed=seed)
    return [(e["id"], e["inputs"].tolist(), e["targets"].tolist(), e["images"].tobytes())
            for e in got]

  first = run(3)
  assert run(3) == first
  assert sorted(run(4)) == sorted(first)


def test_packing_keeps_every_token_and_image_once(story_tasks):
  examples = _examples(story_tasks[0]) + _examples(story_tasks[1])[:3]
  tpi = 2
  rows = packing.pack(examples, row_length=96, max_images_per_row=8, tokens_per_image=tpi,
                      image_token_id=_image_id(), image_shape=(STORY_SIZE, STORY_SIZE, 3))

  def key(tokens, images):
    return tuple(tokens), np.asarray(images, np.uint8).tobytes()

  want = collections.Counter(
      key(np.concatenate([np.repeat(e["inputs"], np.where(e["inputs"] == _image_id(), tpi, 1)),
                          e["targets"]]), e["images"]) for e in examples)
  got = collections.Counter()
  for row in rows:
    for segment in range(1, row["decoder_segment_ids"].max() + 1):
      tokens = row["decoder_target_tokens"][row["decoder_segment_ids"] == segment]
      images = row["images"][row["image_mask"] & (row["image_segment_ids"] == segment)]
      got[key(tokens, images)] += 1
  assert got == want
  assert sum(r["decoder_loss_weights"].sum() for r in rows) == sum(
      e["targets"].size for e in examples)
