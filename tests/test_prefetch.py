"""Host -> device prefetch: same stream as without it, errors in place, a prompt close()."""
import json
import re
import threading

import jax
import numpy as np
import pytest
import tensorflow as tf

from vlpjax import config as config_lib
from vlpjax import prefetch
from vlpjax import trainer
from tests.test_trainer import make_config, write_records_with_a_bad_one

# Generous bound for a thread to finish once told to stop. Not a speed assertion: close()
# must end the thread at all (a hang would make the join time out and the test fail).
JOIN_SECONDS = 30


def _items(n):
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(4, 3)).astype(np.float32), "i": np.full((4,), i)}
          for i in range(n)]


def _to_device(item):
  return {k: jax.device_put(v) for k, v in item.items()}


@pytest.mark.parametrize("size", [0, 1, 3])
def test_order_and_values_are_those_of_the_plain_loop(size):
  items = _items(7)
  with prefetch.DevicePrefetch(iter(items), _to_device, size) as stream:
    got = list(stream)
  assert len(got) == len(items)
  for (host, device), item in zip(got, items):
    assert host is item  # The very host batch, not a copy.
    for key, value in item.items():
      np.testing.assert_array_equal(np.asarray(device[key]), value)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_reads_at_most_size_plus_one_ahead(size):
  read = []

  def source():
    for i in range(20):
      read.append(i)
      yield i

  with prefetch.DevicePrefetch(source(), lambda i: -i, size) as stream:
    for consumed, (i, neg) in enumerate(stream, start=1):
      assert neg == -i
      # `size` queued, plus the one the thread holds while it waits for room.
      assert len(read) <= consumed + size + 1


@pytest.mark.parametrize("size", [0, 1, 3])
@pytest.mark.parametrize("where", ["source", "to_device"])
def test_an_error_arrives_after_the_good_items_before_it(size, where):
  k = 4

  def source():
    for i in range(10):
      if where == "source" and i == k:
        try:
          raise KeyError("the root cause")
        except KeyError as cause:
          raise ValueError(f"bad item {i}") from cause
      yield i

  def to_device(i):
    if where == "to_device" and i == k:
      raise tf.errors.DataLossError(None, None, f"bad item {i}")
    return i * 10

  error_type = ValueError if where == "source" else tf.errors.DataLossError
  stream = prefetch.DevicePrefetch(source(), to_device, size)
  got = []
  with pytest.raises(error_type, match=f"bad item {k}") as raised:
    for item in stream:
      got.append(item)
  assert got == [(i, i * 10) for i in range(k)]
  if where == "source":
    assert isinstance(raised.value.__cause__, KeyError)  # The chain is kept.
  # Like a generator that raised: finished, nothing more is read.
  assert list(stream) == []
  stream.close()


def test_close_stops_a_producer_blocked_on_a_full_queue():
  size = 2
  converted = []
  blocked = threading.Event()

  def to_device(i):
    converted.append(i)
    # Item 0 taken, items 1..size queued: item size+1 then waits for room in the queue.
    if len(converted) == size + 2:
      blocked.set()
    return i

  stream = prefetch.DevicePrefetch(iter(range(1000)), to_device, size)
  assert next(stream) == (0, 0)  # Starts the thread; the consumer then stops reading.
  assert blocked.wait(JOIN_SECONDS)
  thread = stream.thread
  assert thread.is_alive()
  stream.close()
  thread.join(JOIN_SECONDS)
  assert not thread.is_alive()
  assert len(converted) == size + 2  # Nothing was read after close().
  with pytest.raises(StopIteration):
    next(stream)
  stream.close()  # Idempotent.


def test_context_manager_closes_on_an_exception_in_the_loop():
  with pytest.raises(KeyboardInterrupt):
    with prefetch.DevicePrefetch(iter(range(1000)), lambda i: i, 2) as stream:
      next(stream)
      raise KeyboardInterrupt
  stream.thread.join(JOIN_SECONDS)
  assert not stream.thread.is_alive()


def test_to_device_runs_in_the_named_daemon_thread():
  threads = []

  def to_device(item):
    threads.append(threading.current_thread())
    return _to_device(item)

  with prefetch.DevicePrefetch(iter(_items(3)), to_device, 2, name="vlpjax-prefetch") as stream:
    list(stream)
  assert len(threads) == 3 and len(set(threads)) == 1
  assert threads[0] is stream.thread is not threading.main_thread()
  assert threads[0].name == "vlpjax-prefetch" and threads[0].daemon


def test_size_0_runs_no_thread():
  threads = []
  stream = prefetch.DevicePrefetch(iter(range(3)), lambda i: threads.append(
      threading.current_thread()) or i, 0)
  assert list(stream) == [(0, 0), (1, 1), (2, 2)]
  assert stream.thread is None and set(threads) == {threading.current_thread()}


def test_negative_size_is_refused():
  with pytest.raises(ValueError, match="prefetch size"):
    prefetch.DevicePrefetch(iter(()), lambda i: i, -1)


@pytest.mark.parametrize("value", [-1, True])
def test_bad_config_value_names_the_key(value):
  config = make_config(arg="steps=1,batch=16,size=16,eval_every=0")
  config.input.prefetch_to_device = value
  with pytest.raises(config_lib.ConfigError, match=r"config\.input\.prefetch_to_device"):
    trainer._device_batches(config, None, iter(()))


class _CountsFromReadPosition:
  """Like `pipeline.ProcessRows`: task_counts describe the last batch read, not the argument."""

  def __init__(self, n):
    self._batches = iter([{"task_index": np.array([0] * i + [1] * (5 - i))} for i in range(n)])
    self._last = None

  def __iter__(self):
    return self

  def __next__(self):
    self._last = next(self._batches)
    return self._last

  def task_counts(self, batch):
    del batch
    counts = np.bincount(self._last["task_index"], minlength=2)
    return {"a": int(counts[0]), "b": int(counts[1])}


def test_task_counts_belong_to_the_batch_they_come_with():
  # Read ahead by 3, the counts still describe each step's own batch.
  stream = prefetch.DevicePrefetch(trainer._counted(_CountsFromReadPosition(8)),
                                   lambda counted: counted[0]["task_index"].copy(), 3)
  with stream:
    for (batch, counts), device in stream:
      expected = np.bincount(batch["task_index"], minlength=2)
      assert counts == {"a": expected[0], "b": expected[1]}
      np.testing.assert_array_equal(device, batch["task_index"])


def _train(tmp_path, name, prefetch_size, overrides=()):
  config = make_config(arg="steps=3,batch=16,size=16,eval_every=0", overrides=[
      f"input.prefetch_to_device={prefetch_size}", "log_every_steps=1",
      "checkpoint.every_steps=0", *overrides])
  workdir = tmp_path / name
  results = trainer.Loop(config, str(workdir)).run()
  with open(workdir / "metrics.jsonl") as f:
    # Minus the rates: wall-clock measurements differ from run to run.
    metrics = [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_sec")}
               for line in f]
  return jax.device_get(results["state"]["params"]), metrics


def test_trainer_with_and_without_prefetch_is_the_same_run(tmp_path):
  params_0, metrics_0 = _train(tmp_path, "sync", 0)
  params_2, metrics_2 = _train(tmp_path, "prefetch", 2)
  jax.tree.map(np.testing.assert_array_equal, params_2, params_0)
  assert [m["step"] for m in metrics_0] == [1, 2, 3]
  assert metrics_2 == metrics_0
  assert [m["data/examples/shapes_captions"] for m in metrics_2] == [16, 32, 48]


def test_input_error_names_the_step_with_prefetch(tmp_path):
  # Unshuffled, batches of 16: record 20 is in the second batch, read ahead while step 1 runs.
  path = str(tmp_path / "bad.tfrecord")
  write_records_with_a_bad_one(path, count=48, bad_index=20)
  overrides = ["input.task=prefetch_bad_tfrecord", f"input.files={{'train': '{path}'}}",
               "input.pp=resize(16)|value_range(-1, 1)", "input.shuffle_buffer=1"]
  messages = {}
  for size in (0, 2):
    with pytest.raises(trainer.InputError,
                       match=r"step 2: .*record id 'user/bad-20': corrupt image") as raised:
      _train(tmp_path, f"bad{size}", size, overrides)
    assert isinstance(raised.value.__cause__, tf.errors.OpError)
    # tf.data's op numbering and object addresses in the text vary from run to run.
    messages[size] = re.sub(r"0x[0-9a-f]+|\d+", "#", str(raised.value))
  assert messages[2] == messages[0]
