"""Offline caching with Beam's DirectRunner (vlpjax.data.cache) and reading caches back."""
import importlib.util
import json
import os
import re
import sys
import tempfile
import textwrap

from absl import flags
import numpy as np
import pytest
import seqio
import tensorflow as tf

from data_mixtures import shapes as shapes_tasks
from vlpjax.data import cache
from vlpjax.data import preprocessors
from vlpjax.data import shapes
from vlpjax.data import vocab

# The pipeline runs in a subprocess and this process never imports Beam, but Beam is part of
# the test install: a missing Beam must fail here, not skip.
assert importlib.util.find_spec("apache_beam") is not None, "pip install -e '.[test]'"

TASK = "cache_test_shapes"
SIZES = {"train": 24, "validation": 8}
IMAGE_SIZE = 16
SHARDS = 3
TASK_MODULE = "vlpjax_cache_test_tasks"
# The task module the pipeline imports: the same tiny task in its own process.
TASK_MODULE_SOURCE = f"""
from data_mixtures import shapes
shapes.register_cacheable_shapes_task({TASK!r}, image_size={IMAGE_SIZE}, split_sizes={SIZES!r})
"""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """Caches TASK once for the module; `use_cached=True` finds it while tests run."""
  module_dir = tmp_path_factory.mktemp("task_module")
  (module_dir / f"{TASK_MODULE}.py").write_text(textwrap.dedent(TASK_MODULE_SOURCE))
  out = str(tmp_path_factory.mktemp("cache"))
  old_dirs = list(seqio.get_global_cache_dirs())
  with pytest.MonkeyPatch.context() as mp:
    mp.syspath_prepend(str(module_dir))
    written = cache.cache_tasks([TASK], out, module_imports=(TASK_MODULE,),
                                min_shards=SHARDS, max_shards=SHARDS)
    assert written == {TASK: os.path.join(out, TASK)}
    cache.use_cache_dir(out)
    yield out
  seqio.set_global_cache_dirs(old_dirs)
  sys.modules.pop(TASK_MODULE, None)


def _by_id(ds):
  examples = {}
  for ex in ds.as_numpy_iterator():
    assert ex["id"] not in examples, f"duplicate id {ex['id']}"
    examples[ex["id"]] = ex
  return examples


def _assert_same_example(cached, fresh, rid):
  assert sorted(cached) == sorted(fresh), rid
  for key, want in fresh.items():
    got = cached[key]
    if isinstance(want, bytes):
      assert got == want, (rid, key)
    else:
      assert got.dtype == want.dtype and got.shape == want.shape, (rid, key)
      np.testing.assert_array_equal(got, want, err_msg=f"{rid} {key}")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_cached_examples_equal_uncached(cache_dir, split):
  task = seqio.get_mixture_or_task(TASK)
  assert task.cache_dir == os.path.join(cache_dir, TASK)
  cache.check_cached(TASK, split)
  cached = _by_id(task.get_dataset(split=split, use_cached=True, shuffle=False))
  fresh = _by_id(task.get_dataset(split=split, use_cached=False, shuffle=False))
  assert sorted(fresh) == sorted(f"shapes/{split}/{i}".encode() for i in range(SIZES[split]))
  assert sorted(cached) == sorted(fresh)
  for rid, ex in fresh.items():
    _assert_same_example(cached[rid], ex, rid)
  # And the same examples as the plain (uncacheable) shapes task.
  plain = shapes_tasks.register_shapes_task("cache_test_plain", IMAGE_SIZE, SIZES)
  for rid, ex in _by_id(plain.get_dataset(split=split, shuffle=False)).items():
    _assert_same_example(cached[rid], ex, rid)
  assert fresh[b"shapes/" + split.encode() + b"/0"]["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_cache_files_hold_encoded_images_and_tokens(cache_dir):
  """The records on disk are the pre-placeholder features, checked against the generator."""
  task_dir = os.path.join(cache_dir, TASK)
  files = sorted(tf.io.gfile.glob(os.path.join(task_dir, "train.tfrecord-*")))
  assert len(files) == SHARDS
  with open(os.path.join(task_dir, "stats.train.json")) as f:
    assert json.load(f)["examples"] == SIZES["train"]
  with open(os.path.join(task_dir, "info.train.json")) as f:
    info = json.load(f)["features"]
  assert info["image"] == {"dtype": "string", "shape": []}
  assert info["texts"] == {"dtype": "int32", "shape": [None]}

  spec = {"id": tf.io.FixedLenFeature([], tf.string),
          "image": tf.io.FixedLenFeature([], tf.string),
          "caption": tf.io.FixedLenFeature([], tf.string),
          "texts": tf.io.VarLenFeature(tf.int64)}
  vocabulary = vocab.default_vocabulary()
  seen = set()
  for record in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(record, spec)
    index = int(ex["id"].numpy().decode().rsplit("/", 1)[1])
    want = shapes.generate_example("train", index, IMAGE_SIZE)
    assert ex["image"].numpy() == want["image"]  # The JPEG itself, not pixels.
    assert ex["caption"].numpy().decode() == want["caption"]
    assert tf.sparse.to_dense(ex["texts"]).numpy().tolist() == vocabulary.encode(want["caption"])
    seen.add(index)
  assert seen == set(range(SIZES["train"]))


def _training_stream(seed, num_examples, num_epochs=None,
                     pp="random_resized_crop(8)|flip_lr|value_range(-1, 1)"):
  """Like the trainer: shuffled task stream from the cache, then pp with per-position seeds."""
  task = seqio.get_mixture_or_task(TASK)
  ds = task.get_dataset(split="train", use_cached=True, shuffle=True, seed=seed,
                        num_epochs=num_epochs, shuffle_buffer_size=SIZES["train"],
                        sequence_length={"texts": 16})
  chain = preprocessors.parse_pp(pp)
  base = tf.constant([seed, 1], tf.int64)

  def apply_pp(position, features):
    features = chain(features, tf.random.experimental.stateless_fold_in(base, position))
    return {"id": features["id"], "image": features["image"],
            "texts": preprocessors.pad_to_length(features["texts"], 16)}

  ds = ds.enumerate().map(apply_pp).take(num_examples)
  return list(ds.as_numpy_iterator())


def test_training_reads_cache_shuffled_with_pp(cache_dir):
  del cache_dir
  n = SIZES["train"]
  all_ids = {f"shapes/train/{i}".encode() for i in range(n)}
  one_epoch = [ex["id"] for ex in _training_stream(seed=7, num_examples=2 * n, num_epochs=1)]
  assert len(one_epoch) == n and set(one_epoch) == all_ids
  assert one_epoch != sorted(one_epoch, key=lambda r: int(r.rsplit(b"/", 1)[1]))

  # Endless, as in training (seqio repeats before its shuffle, so epochs blend).
  stream = _training_stream(seed=7, num_examples=3 * n)
  ids = [ex["id"] for ex in stream]
  assert len(ids) == 3 * n and set(ids) <= all_ids
  for ex in stream:
    assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.float32
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["texts"].shape == (16,) and ex["texts"][0] > 1
  # The same seed gives the same examples and the same crops; another seed does not.
  again = _training_stream(seed=7, num_examples=3 * n)
  assert [ex["id"] for ex in again] == ids
  for a, b in zip(stream, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert [ex["id"] for ex in _training_stream(seed=8, num_examples=3 * n)] != ids


def test_check_cached_errors_name_task_split_and_fix(cache_dir):
  shapes_tasks.register_cacheable_shapes_task("cache_test_never_cached", image_size=16,
                                              split_sizes={"train": 4})
  with pytest.raises(cache.NotCachedError,
                     match=r"'cache_test_never_cached' is not cached.*searched \[.*"
                           + os.path.basename(cache_dir)
                           + r".*python -m vlpjax.data.cache --tasks=cache_test_never_cached"):
    cache.check_cached("cache_test_never_cached", "train")
  with pytest.raises(cache.NotCachedError, match=r"'shapes_captions' cannot be cached.*"
                                                 r"CacheDatasetPlaceholder"):
    cache.check_cached("shapes_captions", "train")
  with pytest.raises(cache.NotCachedError, match=rf"'{TASK}'.*has no split 'test'"):
    cache.check_cached(TASK, "test")


def test_cache_tasks_refuses_bad_names_before_running_beam(tmp_path):
  with pytest.raises(ValueError, match="Unknown seqio task or mixture 'no_such_task'"):
    cache.cache_tasks(["no_such_task"], str(tmp_path))
  with pytest.raises(ValueError, match="'shapes_captions' cannot be cached"):
    cache.cache_tasks(["shapes_captions"], str(tmp_path))
  with pytest.raises(ValueError, match="cannot import task module 'no_such_module'"):
    cache.cache_tasks([TASK], str(tmp_path), module_imports=("no_such_module",))
  assert not os.listdir(tmp_path)


def test_cache_tasks_reports_a_failed_pipeline_with_its_log(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # Where the log is kept.
  with pytest.raises(cache.CacheError) as error:
    cache.cache_tasks(["shapes_captions_cacheable"], str(tmp_path / "out"),
                      runner="NoSuchRunner")
  message = str(error.value)
  assert re.search(r"failed \(exit code [1-9]", message)
  # The end of the pipeline's log, where Beam says what was wrong, is in the message.
  assert "Unexpected pipeline runner: NoSuchRunner" in message
  logs = list(tmp_path.glob("vlpjax_cache_*.log"))
  assert len(logs) == 1 and str(logs[0]) in message


def test_cache_command_passes_options_with_commas_intact():
  argv = cache.cache_command(["a.b", "c"], "gs://bucket/cache", "DataflowRunner",
                             module_imports=("data_mixtures", "my.tasks"),
                             extra_pipeline_options=["--project=p", "--experiments=x,y"],
                             min_shards=8)
  args = dict(a.split("=", 1) for a in argv[3:] if "=" in a)
  parser = flags.ListParser()  # How seqio's --pipeline_options list flag splits.
  assert parser.parse(args["--pipeline_options"]) == [
      "--runner=DataflowRunner", "--project=p", "--experiments=x,y"]
  assert parser.parse(args["--tasks"]) == [r"a\.b", "c"]  # Exact names, not regexes.
  assert args["--output_cache_dir"] == "gs://bucket/cache"
  assert args["--min_shards"] == "8"
  assert [a for a in argv if a.startswith("--module_import=")] == [
      "--module_import=data_mixtures", "--module_import=my.tasks"]
