"""Bad records: tasks describe what is wrong, the run decides what to do about it.

A task's preprocessors never raise on a bad record. They set the string feature
`PROBLEM_KEY` to a short reason ("corrupt image", "empty caption", "box 3 out of
range [0, 1]", ...) and keep the record's shapes valid (e.g. a 1x1 blank image),
so the rest of the task runs on it harmlessly. `apply_policy`, called by the input
pipelines where the task name, split and run config are known, then either

  "error"  stops with `BadRecordError`: task, split, record id and reason, or
  "skip"   drops the record and counts it by reason (`SkipCounter`, logged by the
           trainer as `data/skipped/<reason>`).

Checks run in TF; only bad records ever reach Python, so good data pays nothing.
Reasons should be short and stable (they become metric names); put details
such as the offending value after a colon: "time out of range: end 12.5 > 10.0".
The counter keys on the text before the first colon.
"""
import collections
import threading
from typing import Dict, Iterable, Tuple

import numpy as np
import tensorflow as tf

PROBLEM_KEY = "problem"
POLICIES = ("error", "skip")
Features = Dict[str, tf.Tensor]


class BadRecordError(ValueError):
  """A bad record under the "error" policy; the message names task, split and id."""


def first_problem(checks: Iterable[Tuple[tf.Tensor, str]]) -> tf.Tensor:
  """The reason of the first failed check ("" when all pass).

  `checks` are (ok, reason) pairs: `ok` a scalar bool tensor, `reason` a Python
  string or a scalar string tensor.
  """
  problem = tf.constant("")
  for ok, reason in reversed(list(checks)):
    problem = tf.where(tf.cast(ok, tf.bool), problem, tf.cast(reason, tf.string))
  return problem


def add_problem(features: Features, problem: tf.Tensor) -> Features:
  """Records `problem` unless the record already has one (the first reason wins)."""
  old = features.get(PROBLEM_KEY, tf.constant(""))
  return {**features, PROBLEM_KEY: tf.where(tf.equal(old, ""), problem, old)}


def check(ds: tf.data.Dataset, check_fn) -> tf.data.Dataset:
  """A seqio preprocessor body: `check_fn(features) -> [(ok, reason), ...]` per record."""
  return ds.map(lambda f: add_problem(f, first_problem(check_fn(f))),
                num_parallel_calls=tf.data.AUTOTUNE)


def reason_key(problem: str) -> str:
  """The metric-name part of a reason: text before ':', spaces as underscores."""
  return problem.split(":", 1)[0].strip().replace(" ", "_") or "unknown"


class SkipCounter:
  """Thread-safe counts of skipped records, by reason key."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()

  def add(self, problem: str) -> None:
    with self._lock:
      self._counts[reason_key(problem)] += 1

  @property
  def counts(self) -> Dict[str, int]:
    with self._lock:
      return dict(self._counts)

  @property
  def total(self) -> int:
    with self._lock:
      return sum(self._counts.values())


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def apply_policy(ds: tf.data.Dataset, *, policy: str, task: str, split: str,
                 counter: SkipCounter = None) -> tf.data.Dataset:
  """Raises on or drops records with a problem; removes `PROBLEM_KEY` either way."""
  if policy not in POLICIES:
    raise ValueError(f"bad-record policy {policy!r} is not one of {POLICIES} "
                     "(config key input.bad_records).")
  if PROBLEM_KEY not in ds.element_spec:
    return ds
  where = f"task {task!r}, split {split!r}"

  def raise_error(record_id, problem):
    rid = _text(record_id) or "<no id>"
    raise BadRecordError(f"bad record in {where}, record id {rid!r}: {_text(problem)} "
                         "(set input.bad_records='skip' to skip and count such records)")

  def fine(features):
    return tf.equal(features[PROBLEM_KEY], "")

  def drop_key(features):
    return {k: v for k, v in features.items() if k != PROBLEM_KEY}

  if policy == "error":
    def keep(problem, record_id):
      raise_error(record_id, problem)
      return False
  else:
    if counter is None:
      raise ValueError("apply_policy(policy='skip') needs a SkipCounter.")

    def keep(problem, record_id):
      del record_id
      counter.add(_text(problem))
      return False

  # A filter predicate always runs, so neither the check nor the count can be pruned.
  ds = ds.filter(lambda f: tf.cond(fine(f), lambda: tf.constant(True), lambda: tf.numpy_function(
      keep, [f[PROBLEM_KEY], f.get("id", tf.constant(""))], tf.bool, stateful=True)))
  return ds.map(drop_key)

