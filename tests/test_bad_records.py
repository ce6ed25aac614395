"""Bad records: each case is reported with its reason, then skipped and counted or raised.

Image-caption records here; the other kinds test their own reasons in their test files
and share `bad_records.apply_policy`, tested here.
"""
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import pipeline
from vlpjax.data import preprocessors
from vlpjax.data import shapes
from vlpjax.data import tasks

TASK = "test_bad_image_caption"
# id -> (what is wrong with the record, the reason it must get)
CASES = {
    "bad/truncated": ("truncated", "corrupt image"),
    "bad/garbage": ("garbage", "corrupt image"),
    "bad/no-image": ("no image", "missing image"),
    "bad/empty-caption": ("empty caption", "empty caption"),
    "bad/no-caption": ("no caption", "empty caption"),
}


def _write(path, num_good=12):
  """num_good good records, with the bad ones of CASES at known places."""
  bad_at = {2 + 2 * i: rid for i, rid in enumerate(CASES)}
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(num_good + len(CASES)):
      record = shapes.generate_example("train", i, image_size=16)
      image, caption, rid = record["image"], [record["caption"]], record["id"]
      if i in bad_at:
        rid = bad_at[i]
        what = CASES[rid][0]
        image = {"truncated": image[:len(image) // 2], "garbage": b"<html>404</html>",
                 "no image": None}.get(what, image)
        caption = {"empty caption": [" "], "no caption": None}.get(what, caption)
      feature = {"id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rid.encode()]))}
      if image is not None:
        feature["image"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[image]))
      if caption is not None:
        feature["caption"] = tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[c.encode() for c in caption]))
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())
  return num_good


@pytest.fixture(scope="module")
def num_good(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("bad") / "records.tfrecord")
  n = _write(path)
  tasks.register_image_caption_tfrecord_task(TASK, {"train": path})
  return n


def _config(policy):
  return ml_collections.ConfigDict(dict(
      task=TASK, split="train", pp="resize(16)", text_length=8, shuffle_buffer=1,
      bad_records=policy))


def test_each_case_gets_its_reason(num_good):
  del num_good
  task = pipeline.get_provider(TASK)
  ds = task.get_dataset({"texts": 8}, split="train", shuffle=False)
  problems = {ex["id"].decode(): ex[bad_records.PROBLEM_KEY].decode()
              for ex in ds.as_numpy_iterator()}
  for rid, (_, reason) in CASES.items():
    assert bad_records.reason_key(problems[rid]) == reason.replace(" ", "_"), rid
  assert all(p == "" for rid, p in problems.items() if rid not in CASES)


def test_skip_counts_every_reason_and_keeps_the_rest(num_good):
  skipped = bad_records.SkipCounter()
  ds = pipeline.task_dataset(_config("skip"), TASK, shuffle=False, seed=0, num_epochs=1,
                             process_index=0, process_count=1, skipped=skipped,
                             sequence_length={"texts": 8})
  ids = [ex["id"].decode() for ex in ds.as_numpy_iterator()]
  assert len(ids) == num_good and not set(ids) & set(CASES)
  assert bad_records.PROBLEM_KEY not in ds.element_spec
  expected = {}
  for _, reason in CASES.values():
    key = reason.replace(" ", "_")
    expected[key] = expected.get(key, 0) + 1
  assert skipped.counts == expected and skipped.total == len(CASES)


def test_error_names_task_split_and_record(num_good):
  del num_good
  ds = pipeline.task_dataset(_config("error"), TASK, shuffle=False, seed=0, num_epochs=1,
                             process_index=0, process_count=1, sequence_length={"texts": 8})
  first_bad = next(iter(CASES))  # The earliest bad record in the file.
  with pytest.raises(tf.errors.OpError, match=(
      rf"task '{TASK}', split 'train', record id '{first_bad}': corrupt image")):
    list(ds.as_numpy_iterator())


def test_train_batches_skip_and_report(num_good):
  batches = pipeline.train_batches(_config("skip"), global_batch_size=4, seed=0)
  seen = [next(batches) for _ in range(6)]  # 24 examples: two passes over the good ones.
  assert all(b["image"].shape == (4, 16, 16, 3) for b in seen)
  assert batches.task_counts(seen[0]) == {TASK: 4}
  assert batches.skipped.total >= len(CASES)  # At least one full pass was read.
  assert num_good == 12


def test_unknown_policy_names_the_config_key():
  ds = tf.data.Dataset.from_tensors({"id": "a", bad_records.PROBLEM_KEY: ""})
  with pytest.raises(ValueError, match="input.bad_records"):
    bad_records.apply_policy(ds, policy="ignore", task="t", split="s")


def test_first_problem_wins_and_reasons_key():
  features = bad_records.add_problem({}, tf.constant("empty caption"))
  features = bad_records.add_problem(features, tf.constant("corrupt image: x"))
  assert features[bad_records.PROBLEM_KEY].numpy() == b"empty caption"
  checks = [(tf.constant(True), "a"), (tf.constant(False), "b: 1"), (tf.constant(False), "c")]
  assert bad_records.first_problem(checks).numpy() == b"b: 1"
  assert bad_records.reason_key("time out of range: end 12 > 10") == "time_out_of_range"


def test_decode_image_bytes_reasons():
  good = shapes.generate_example("train", 0, image_size=16)["image"]
  for data, problem in ((good, b""), (b"", b"missing image"), (good[:40], b"corrupt image")):
    image, got = preprocessors.decode_image_bytes(tf.constant(data))
    assert got.numpy().startswith(problem) and (got.numpy() == b"") == (problem == b"")
    assert image.shape[-1] == 3 and np.all(np.asarray(image.shape) > 0)
