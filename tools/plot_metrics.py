"""Training and eval curves of `vlpjax.train` workdirs, drawn into one PNG.

  python -m tools.plot_metrics workdirs/siglip_shapes --out curves.png
  python -m tools.plot_metrics runs/base runs/lora --labels base,lora --out cmp.png \\
      --metrics 'train/loss$' 'zeroshot/' --smooth 0.6 --log_y loss

One subplot per metric (titled with its key), one line per workdir, x = step. By default every
train/* loss, every eval metric (counts such as `num_examples` left out) and the learning rate,
last; data/* counters only when asked for. `--metrics` and `--log_y` are regular expressions
searched in the keys (`re.search`: anchor them with ^ and $ to match whole keys).

Metrics come from WORKDIR/metrics.jsonl (the same scalars TensorBoard gets) and from the eval
JSON files (WORKDIR/checkpoints/<step>/eval_results.json, WORKDIR/eval_results/<step>.json; see
vlpjax/workdir.py), so an eval-only run plots too. A step logged twice (a resumed run re-logs
the steps after its last checkpoint) keeps its later value. Eval metrics are sparse: they are
drawn with markers. `--smooth W` draws train curves with TensorBoard's debiased exponential
moving average of weight W over the raw curve, drawn faint.

Rendering uses matplotlib's Agg canvas without pyplot: no display, no global backend change.
"""
import argparse
import io
import json
import math
import os
import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow's first import.
# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf

from vlpjax import workdir as workdir_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

Series = List[Tuple[int, float]]

PANEL_INCHES = (4.0, 3.0)   # Width, height of one subplot.
DPI = 100                   # So one subplot is 400 x 300 pixels.
MAX_COLUMNS = 4
_LEARNING_RATE_NAMES = ("lr", "learning_rate")
_NON_EVAL_GROUPS = ("train", "data")


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def _number(value) -> Optional[float]:
  """The value as a float, or None for what is not a scalar metric (strings, bools, lists)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def _read_jsonl(path: str, values: Dict[str, Dict[int, float]]) -> None:
  """Adds metrics.jsonl's records to `values` ({key: {step: value}}); later lines win."""
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  lines = text.split("\n")
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      # A process killed mid-write leaves half a line: at the end of the file, or in the middle
      # once a resumed run appended after it. Neither should stop anyone looking at the rest.
      killed = " (the run was killed mid-write?)" if lineno == len(lines) else ""
      _warn(f"{path}:{lineno}: skipped a line that is not JSON{killed}: {e.msg}")
      continue
    step = record.get("step") if isinstance(record, dict) else None
    if isinstance(step, bool) or not isinstance(step, int):
      _warn(f"{path}:{lineno}: skipped a line that is not an object with an integer 'step'")
      continue
    for key, value in record.items():
      number = _number(value)
      if key != "step" and number is not None:
        values.setdefault(key, {})[step] = number


def _eval_result_files(workdir: str) -> List[str]:
  return sorted(
      tf.io.gfile.glob(os.path.join(workdir, "checkpoints", "*", workdir_lib.EVAL_RESULTS_FILE))
      + tf.io.gfile.glob(os.path.join(workdir, workdir_lib.EVAL_RESULTS_DIR, "*.json")))


def _read_eval_file(path: str, values: Dict[str, Dict[int, float]]) -> None:
  """Adds one {"step": n, evaluator: {metric: value}} file to `values`."""
  try:
    results = workdir_lib.read_eval_results(path)
  except json.JSONDecodeError as e:
    _warn(f"{path}: skipped, not JSON: {e}")
    return
  if not isinstance(results, dict):
    _warn(f"{path}: skipped, not a JSON object")
    return
  step = results.get("step")
  # The file is named after its step (checkpoints/<step>/, eval_results/<step>.json).
  name = os.path.basename(path)
  name = (os.path.basename(os.path.dirname(path)) if name == workdir_lib.EVAL_RESULTS_FILE
          else os.path.splitext(name)[0])
  if step is None and name.isdigit():
    step = int(name)
  if isinstance(step, bool) or not isinstance(step, int):
    _warn(f"{path}: skipped, no integer 'step' in it or in its name")
    return
  for evaluator, metrics in results.items():
    if not isinstance(metrics, dict):
      continue
    for metric, value in metrics.items():
      number = _number(value)
      if number is not None:
        values.setdefault(f"{evaluator}/{metric}", {})[step] = number


def read_metrics(workdir: str) -> Dict[str, Series]:
  """{key: [(step, value)] sorted by step} of a workdir's metrics.jsonl and eval JSON files.

  A step's later value wins, and the eval JSON files are read after metrics.jsonl: they hold the
  newest evaluation of a checkpoint (a later eval-only run merges its numbers into them).
  """
  if not tf.io.gfile.isdir(workdir):
    raise ValueError(f"workdir {workdir} does not exist.")
  jsonl = os.path.join(workdir, "metrics.jsonl")
  eval_files = _eval_result_files(workdir)
  has_jsonl = tf.io.gfile.exists(jsonl)
  if not has_jsonl and not eval_files:
    raise ValueError(f"{workdir} has no metrics.jsonl and no eval_results.json files: "
                     "is it a vlpjax.train workdir?")
  values: Dict[str, Dict[int, float]] = {}
  if has_jsonl:
    _read_jsonl(jsonl, values)
  for path in eval_files:
    _read_eval_file(path, values)
  return {key: sorted(values[key].items()) for key in sorted(values)}


def ema(values: Sequence[float], weight: float) -> np.ndarray:
  """TensorBoard's smoothing: exponential moving average, debiased so it starts at the data.

  s_t = sum_{i<=t} (1 - w) w^(t-i) x_i / (1 - w^(t+1)), over the finite points only:
  non-finite points are kept as they are and do not enter the average.
  """
  if not 0.0 <= weight < 1.0:
    raise ValueError(f"smoothing weight must be in [0, 1), got {weight}.")
  values = np.asarray(values, np.float64)
  out = values.copy()
  accumulated, count = 0.0, 0
  for i, value in enumerate(values):
    if not np.isfinite(value):
      continue
    accumulated = accumulated * weight + (1.0 - weight) * value
    count += 1
    out[i] = accumulated / (1.0 - weight ** count)
  return out


def _group(key: str) -> str:
  return key.split("/", 1)[0] if "/" in key else ""


def _name(key: str) -> str:
  return key.split("/", 1)[-1]


def is_eval(key: str) -> bool:
  return _group(key) not in _NON_EVAL_GROUPS


def is_learning_rate(key: str) -> bool:
  return _group(key) == "train" and _name(key) in _LEARNING_RATE_NAMES


def _is_train_loss(key: str) -> bool:
  return _group(key) == "train" and "loss" in _name(key)


def _panel_order(key: str) -> Tuple[int, bool, str]:
  """train/loss, other train losses, eval metrics by evaluator, other train and data keys,
  the learning rate last."""
  rank = (0 if _is_train_loss(key) else 1 if is_eval(key) else 3 if is_learning_rate(key)
          else 2)
  return rank, key != "train/loss", key


def default_metrics(keys: Sequence[str]) -> List[str]:
  """Train losses, eval metrics and the learning rate, in `_panel_order`."""
  # Counts (num_examples, num_tokens) say how an eval ran, not how well the model does, and
  # chance levels are constants: neither is worth a panel of its own (--metrics still can).
  chosen = [k for k in set(keys) if _is_train_loss(k) or is_learning_rate(k)
            or (is_eval(k) and not _name(k).startswith(("num_", "chance")))]
  return sorted(chosen, key=_panel_order)


def select_metrics(keys: Sequence[str], patterns: Sequence[str]) -> List[str]:
  """Keys matching each regex in turn (in `_panel_order` within one); every regex must match."""
  ordered = sorted(set(keys), key=_panel_order)
  chosen: List[str] = []
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"--metrics {pattern!r} is not a regular expression: {e}") from None
    matched = [k for k in ordered if regex.search(k)]
    if not matched:
      raise ValueError(f"--metrics {pattern!r} matches no metric; available: "
                       f"{', '.join(sorted(set(keys)))}.")
    chosen += [k for k in matched if k not in chosen]
  return chosen


def grid_shape(n: int) -> Tuple[int, int]:
  """(rows, columns) for n subplots: about square, at most MAX_COLUMNS wide."""
  columns = min(MAX_COLUMNS, math.ceil(math.sqrt(n)))
  return math.ceil(n / columns), columns


def figure(runs: Mapping[str, Mapping[str, Series]], metrics: Sequence[str],
           smooth: float = 0.0, log_y: Optional[str] = None):
  """A matplotlib Figure of `metrics` for `runs` ({label: read_metrics output})."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  log_regex = re.compile(log_y) if log_y else None
  rows, columns = grid_shape(len(metrics))
  fig = Figure(figsize=(columns * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI,
               layout="constrained")
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for index, (ax, key) in enumerate(zip(axes, metrics)):
    smoothed = smooth > 0 and _group(key) == "train" and not is_learning_rate(key)
    for run_index, series in enumerate(runs.values()):
      if key not in series:
        continue
      steps, values = np.asarray(series[key], np.float64).reshape(-1, 2).T
      color = f"C{run_index % 10}"
      if is_eval(key):
        ax.plot(steps, values, color=color, marker="o", markersize=4, linewidth=1)
      elif smoothed:
        ax.plot(steps, values, color=color, linewidth=1, alpha=0.25)
        ax.plot(steps, ema(values, smooth), color=color, linewidth=1.5)
      else:
        ax.plot(steps, values, color=color, linewidth=1.5)
    ax.set_title(key, fontsize=10)
    ax.grid(alpha=0.3)
    if log_regex and log_regex.search(key):
      ax.set_yscale("log")
    if index + columns >= len(metrics):  # The lowest subplot of its column.
      ax.set_xlabel("step")
  for ax in axes[len(metrics):]:
    ax.set_visible(False)
  handles = [Line2D([], [], color=f"C{i % 10}", linewidth=1.5) for i in range(len(runs))]
  fig.legend(handles, list(runs), loc="outside upper center", ncols=min(len(runs), 4),
             frameon=False)
  return fig


def _labels(workdirs: Sequence[str], labels: Optional[Sequence[str]]) -> List[str]:
  if labels is not None:
    labels = list(labels)
    if len(labels) != len(workdirs):
      raise ValueError(f"{len(labels)} labels {labels} for {len(workdirs)} workdirs.")
    if len(set(labels)) != len(labels):
      raise ValueError(f"labels must differ from each other, got {labels}.")
    return labels
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  # Two runs/*/siglip workdirs would share a basename: then their paths tell them apart.
  return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def plot(workdirs: Sequence[str], out: str, metrics: Optional[Sequence[str]] = None,
         labels: Optional[Sequence[str]] = None, smooth: float = 0.0,
         log_y: Optional[str] = None) -> List[str]:
  """Draws the workdirs' curves into the PNG `out`; returns the metric keys drawn, in order.

  metrics: regexes selecting keys (None: `default_metrics`). labels: one per workdir (default
  their basenames). smooth: EMA weight in [0, 1) for train curves. log_y: regex of the keys
  drawn with a log y axis.
  """
  if not workdirs:
    raise ValueError("no workdir given.")
  if not 0.0 <= smooth < 1.0:
    raise ValueError(f"--smooth must be in [0, 1), got {smooth}.")
  if isinstance(metrics, str):
    metrics = [metrics]
  names = _labels(workdirs, labels)
  runs = {name: read_metrics(w) for name, w in zip(names, workdirs)}
  keys = sorted({key for series in runs.values() for key in series})
  if not keys:
    raise ValueError(f"no metrics logged yet in {', '.join(workdirs)}.")
  for name, workdir in zip(names, workdirs):
    if not runs[name]:
      _warn(f"no metrics logged yet in {workdir}.")
  chosen = default_metrics(keys) if metrics is None else select_metrics(keys, metrics)
  if not chosen:
    raise ValueError(f"none of the default metrics was logged; pick some with --metrics from: "
                     f"{', '.join(keys)}.")
  if log_y:
    try:
      log_regex = re.compile(log_y)
    except re.error as e:
      raise ValueError(f"--log_y {log_y!r} is not a regular expression: {e}") from None
    if not any(log_regex.search(k) for k in chosen):
      raise ValueError(f"--log_y {log_y!r} matches none of the metrics drawn: "
                       f"{', '.join(chosen)}.")
  fig = figure(runs, chosen, smooth=smooth, log_y=log_y)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=DPI)
  directory = os.path.dirname(out)
  if directory:
    tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(out, "wb") as f:
    f.write(buffer.getvalue())
  return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.plot_metrics", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="vlpjax.train workdirs (local or gs://)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--metrics", nargs="+", metavar="REGEX",
                      help="keys to draw, in this order (default: losses, evals, learning rate)")
  parser.add_argument("--labels", help="comma-separated legend names, one per workdir")
  parser.add_argument("--smooth", type=float, default=0.0,
                      help="EMA weight in [0, 1) for train curves, as TensorBoard's slider")
  parser.add_argument("--log_y", metavar="REGEX", help="keys drawn with a log y axis")
  args = parser.parse_args(argv)
  labels = args.labels.split(",") if args.labels is not None else None
  try:
    drawn = plot(args.workdirs, args.out, metrics=args.metrics, labels=labels,
                 smooth=args.smooth, log_y=args.log_y)
  except ValueError as e:
    parser.error(str(e))
  print(f"wrote {args.out} ({len(drawn)} metrics)")
  for key in drawn:
    print(f"  {key}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
