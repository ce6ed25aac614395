"""Where metrics go: console progress, TensorBoard (clu metric writers) and a JSONL file.

Only the lead process writes files; every process may print.
"""
import json
import os
import sys
import time
from typing import Mapping, Optional

from clu import metric_writers
import numpy as np
import tensorflow as tf


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON object per `write_scalars` call: {"step": n, "name": value, ...}."""

  def __init__(self, path: str):
    self._file = tf.io.gfile.GFile(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def make_writer(workdir: str, is_lead: bool) -> metric_writers.MetricWriter:
  if not is_lead:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])


def duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Console line per log interval: step, loss, steps/s, examples/s, ETA."""

  def __init__(self, total_steps: int, global_batch_size: int, start_step: int,
               stream=sys.stdout, quiet: bool = False):
    self.total_steps = total_steps
    self.quiet = quiet  # Hosts other than the first keep the console to one voice.
    self.batch = global_batch_size
    self.stream = stream
    self._last_step = start_step
    self._last_time: Optional[float] = None

  def start(self, step: int) -> None:
    """Call once the first step is compiled, so compile time does not skew the rate."""
    self._last_step, self._last_time = step, time.perf_counter()

  def rate(self, step: int) -> Mapping[str, float]:
    now = time.perf_counter()
    if self._last_time is None or step == self._last_step:
      return {}
    steps_per_s = (step - self._last_step) / (now - self._last_time)
    self._last_step, self._last_time = step, now
    return {"steps_per_sec": steps_per_s, "examples_per_sec": steps_per_s * self.batch}

  def report(self, step: int, scalars: Mapping[str, float], rate: Mapping[str, float]) -> None:
    if self.quiet:
      return
    parts = [f"step {step}/{self.total_steps}"]
    for key in ("loss",):
      if key in scalars:
        parts.append(f"{key} {scalars[key]:.4f}")
    if rate:
      sps = rate["steps_per_sec"]
      parts += [f"{sps:.2f} steps/s", f"{rate['examples_per_sec']:.0f} ex/s",
                f"ETA {duration((self.total_steps - step) / max(sps, 1e-9))}"]
    print(" | ".join(parts), file=self.stream, flush=True)


def to_host_scalars(metrics) -> dict:
  """Device metrics -> Python floats (one transfer for the whole dict)."""
  return {k: float(np.asarray(v)) for k, v in metrics.items()}
