"""The embedded stories, videos and documents generators (tiny counts, CPU)."""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vlpjax.data import documents, shapes, stories, videos

MODULES = (stories, videos, documents)


def _decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _as_python(value):
  """Parsed tensors -> the plain values a generated record holds."""
  value = value.numpy() if hasattr(value, "numpy") else value
  if isinstance(value, np.ndarray):
    return [_as_python(v) for v in value.tolist()]
  if isinstance(value, list):
    return [_as_python(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _normalised(record):
  """Record with str turned into bytes, as a tf.train.Example gives them back."""
  def fix(v):
    if isinstance(v, str):
      return v.encode("utf-8")
    if isinstance(v, (list, tuple)):
      return [fix(x) for x in v]
    return v
  return {k: fix(v) for k, v in record.items()}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_deterministic_per_split_and_index(module):
  a = module.generate_example("train", 3)
  assert a == module.generate_example("train", 3)
  assert a != module.generate_example("validation", 3)
  assert a != module.generate_example("train", 4)
  assert a["id"].endswith("/train/3")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_unknown_split_is_an_error(module):
  with pytest.raises(ValueError, match="known"):
    module.make_dataset("tran")


def test_stories_have_one_text_or_image_per_position():
  saw_image_first = saw_text_first = False
  for i in range(20):
    record = stories.generate_example("validation", i, image_size=32)
    stories.validate_record(record)
    n = len(record["texts"])
    assert len(record["images"]) == len(record["image_labels"]) == n
    num_images = 0
    for text, image, label in zip(record["texts"], record["images"],
                                  record["image_labels"]):
      assert bool(text) != bool(image)
      if image:
        num_images += 1
        assert _decode(image).shape == (32, 32, 3)
        assert 0 <= label < len(shapes.CLASS_NAMES)
      else:
        assert label == stories.NO_LABEL and text.endswith(".")
    assert 2 <= num_images <= 5
    saw_image_first |= bool(record["images"][0])
    saw_text_first |= bool(record["texts"][0])
  assert saw_image_first and saw_text_first


def test_story_image_label_matches_its_sentence():
  # The opening sentence names the first image's class.
  record = stories.generate_example("train", 0)
  first_label = next(l for l in record["image_labels"] if l >= 0)
  opening = next(t for t in record["texts"] if t)
  assert shapes.CLASS_NAMES[first_label] in opening


def test_video_events_are_timed_inside_the_clip():
  for i in range(10):
    record = videos.generate_example("validation", i, num_frames=8)
    videos.validate_record(record)
    assert len(record["frames"]) == 8
    assert _decode(record["frames"][0]).shape == (32, 32, 3)
    duration = record["duration"]
    assert 4 <= duration <= 8
    assert record["caption"] and record["caption"][0].startswith("a ")
    for starts, ends in ((record["start"], record["end"]),
                         (record["speech_start"], record["speech_end"])):
      assert all(0 <= s < e <= duration for s, e in zip(starts, ends))
      assert starts == sorted(starts)
      # float32 in a tf.train.Example holds every time exactly.
      assert all(float(np.float32(t)) == t for t in starts + ends)
    # The narrator speaks one segment at a time.
    assert all(e <= s for e, s in zip(record["speech_end"], record["speech_start"][1:]))


def test_video_frames_show_the_appearing_shape():
  record = videos.generate_example("train", 0)
  dt = record["duration"] / len(record["frames"])
  first = int(round(record["start"][0] / dt))
  # The frame where the first shape appears differs from the frame before it
  # (or, at frame 0, from a plain background) by much more than noise.
  frame = _decode(record["frames"][first]).astype(int)
  before = (_decode(record["frames"][first - 1]).astype(int) if first > 0
            else np.median(frame, axis=(0, 1)))
  assert np.abs(frame - before).max() > 80


def test_document_boxes_are_inside_the_page_and_hold_ink():
  for i in range(20):
    record = documents.generate_example("validation", i)
    documents.validate_record(record)
    page = _decode(record["image"])
    assert page.shape == (record["height"], record["width"], 3)
    boxes = np.array(record["boxes"], np.int64).reshape(-1, 4)
    assert len(boxes) == len(record["words"]) > 0
    ink = np.any(page != documents.BACKGROUND, axis=-1)
    for word, (x0, y0, x1, y1) in zip(record["words"], boxes):
      assert 0 <= x0 < x1 <= record["width"] and 0 <= y0 < y1 <= record["height"]
      crop = ink[y0:y1, x0:x1]
      assert crop.any(), (record["id"], word)
      # Ink in every character cell: the box is the whole word, not a part.
      assert crop.any(axis=0).sum() >= len(word), (record["id"], word)
    # Words never share pixels, so each box's ink is its own word's.
    for a in range(len(boxes)):
      for b in range(a + 1, len(boxes)):
        assert not documents._overlaps(boxes[a], boxes[b])
    # Outside all boxes there is no text ink (dark), only the coloured shape.
    outside = ink.copy()
    for x0, y0, x1, y1 in boxes:
      outside[y0:y1, x0:x1] = False
    assert np.all(page[outside].max(axis=-1) > 100), record["id"]


def test_document_answers_come_from_the_page():
  seen = set()
  for i in range(40):
    record = documents.generate_example("train", i)
    words, question, answer = record["words"], record["question"], record["answer"]
    seen.add(question)
    if question == "what is the first word on the page?":
      assert answer == words[0]
    elif question.startswith("what is the "):
      label = question[len("what is the "):-1]
      assert words[words.index(label) + 1] == answer
    elif question == "what colour is the shape?":
      assert answer in shapes.COLOURS
    else:
      assert answer in shapes.SHAPES
  assert "what is the total?" in seen and "what colour is the shape?" in seen


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_tfrecord_round_trip_and_dataset_match_the_generator(module, tmp_path):
  names = module.write_tfrecords("validation", str(tmp_path / "data"),
                                 num_examples=3, num_shards=2)
  assert len(names) == 2
  parsed = [tf.io.parse_single_example(s, module.feature_description())
            for s in tf.data.TFRecordDataset(names)]
  from_dataset = list(module.make_dataset("validation", num_examples=3))
  expected = [_normalised(module.generate_example("validation", i)) for i in range(3)]
  # Round robin over two shards: file 0 holds examples 0 and 2.
  for got, want in zip(parsed, [expected[0], expected[2], expected[1]]):
    assert {k: _as_python(v) for k, v in got.items()} == want
  for got, want in zip(from_dataset, expected):
    assert {k: _as_python(v) for k, v in got.items()} == want
  # Parsed files and the in-memory dataset have the same structure and dtypes.
  for key, value in parsed[0].items():
    assert value.dtype == from_dataset[0][key].dtype, key
    assert value.shape.rank == from_dataset[0][key].shape.rank, key


def test_stories_validate_record_names_the_id():
  record = stories.generate_example("train", 1)
  both = dict(record, texts=["oops"] + record["texts"][1:],
              images=[b"\xff\xd8"] + record["images"][1:])
  with pytest.raises(ValueError, match=r"'stories/train/1'.*position 0 has both"):
    stories.validate_record(both)
  neither = dict(record, texts=[""] + record["texts"][1:],
                 images=[b""] + record["images"][1:])
  with pytest.raises(ValueError, match=r"'stories/train/1'.*position 0 has neither"):
    stories.validate_record(neither)
  short = dict(record, images=record["images"][:-1])
  with pytest.raises(ValueError, match=r"'stories/train/1'.*lengths"):
    stories.validate_record(short)


def test_videos_validate_record_names_the_id():
  record = videos.generate_example("train", 2)
  reversed_ = dict(record, start=[record["end"][0]] + record["start"][1:],
                   end=[record["start"][0]] + record["end"][1:])
  with pytest.raises(ValueError, match=r"'videos/train/2'.*segment 0 of caption"):
    videos.validate_record(reversed_)
  late = dict(record, speech_end=record["speech_end"][:-1] + [record["duration"] + 1])
  with pytest.raises(ValueError, match=r"'videos/train/2'.*speech_text"):
    videos.validate_record(late)
  with pytest.raises(ValueError, match=r"'videos/train/2'.*lengths"):
    videos.validate_record(dict(record, caption=record["caption"] + ["extra"]))


def test_documents_validate_record_names_the_id():
  record = documents.generate_example("train", 5)
  boxes = list(record["boxes"])
  flipped = boxes[:]
  flipped[0], flipped[2] = boxes[2], boxes[0]
  with pytest.raises(ValueError, match=r"'documents/train/5'.*x1 < x0"):
    documents.validate_record(dict(record, boxes=flipped))
  outside = boxes[:]
  outside[2] = record["width"] + 3.0
  with pytest.raises(ValueError, match=r"'documents/train/5'.*outside"):
    documents.validate_record(dict(record, boxes=outside))
  with pytest.raises(ValueError, match=r"'documents/train/5'.*box values"):
    documents.validate_record(dict(record, boxes=boxes[:-1]))
