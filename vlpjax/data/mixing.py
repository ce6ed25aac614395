"""Mixing tasks by rate in Python, one example at a time.

seqio's Mixture samples inside tf.data, which needs every task to yield the same features. The
data kinds here do not (a text-only task has no images, a video task has frames), and the
trainer wants per-task counts, so the mixture is sampled here instead: a deterministic choice
per stream position from (seed, position), each task an endless iterator of its own.
A task that runs out is repeated by its own iterator; the mixture never stops.
"""
import dataclasses
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import seqio

_CHUNK = 4096  # choices drawn per RNG call; any value gives the same stream


@dataclasses.dataclass(frozen=True)
class Member:
  task: str
  rate: float


def members(provider_name: str, get_provider: Callable[[str], object]) -> List[Member]:
  """The leaf tasks of a task or (nested) mixture with their normalised rates."""
  provider = get_provider(provider_name)
  if isinstance(provider, seqio.Mixture):
    found = [Member(t.name, float(provider.get_rate(t))) for t in provider.tasks]
  else:
    found = [Member(provider.name, 1.0)]
  found = [m for m in found if m.rate > 0]
  if not found:
    raise ValueError(f"mixture {provider_name!r} has no task with a positive rate.")
  total = sum(m.rate for m in found)
  return [Member(m.task, m.rate / total) for m in found]


def choices(rates: Sequence[float], seed: int, start: int = 0) -> Iterator[int]:
  """Endless task indices; position p's choice depends only on (seed, p)."""
  chunk, offset = divmod(start, _CHUNK)
  p = np.asarray(rates, np.float64)
  while True:
    rng = np.random.default_rng([seed, chunk])
    drawn = rng.choice(len(p), size=_CHUNK, p=p)
    yield from (int(i) for i in drawn[offset:])
    chunk, offset = chunk + 1, 0


class MixedStream:
  """Endless (task name, example) pairs drawn from per-task iterators by rate."""

  def __init__(self, mixture: Sequence[Member],
               make_iterator: Callable[[str, int], Iterator[dict]], seed: int):
    self.mixture = list(mixture)
    # Each task gets its own seed so two tasks over the same data do not shuffle alike.
    self._iterators = [make_iterator(m.task, seed + 1 + i) for i, m in enumerate(self.mixture)]
    self._choices = choices([m.rate for m in self.mixture], seed)
    self.counts: Dict[str, int] = {m.task: 0 for m in self.mixture}

  def __iter__(self) -> Iterator[Tuple[str, dict]]:
    return self

  def __next__(self) -> Tuple[str, dict]:
    i = next(self._choices)
    task = self.mixture[i].task
    example = next(self._iterators[i])
    self.counts[task] += 1
    return task, example
