"""Host -> device prefetch: the next batches are read and copied while the current step runs.

JAX's async dispatch already lets the host run ahead of the device by one step, but the host
work for a batch (pulling it out of the input pipeline, copying it to the devices) still sits
on the training loop's critical path. `DevicePrefetch` moves it to one background thread that
keeps up to `size` (host batch, device batch) pairs ready in a bounded queue, so the copies
for steps N+1..N+size happen while step N computes.

The consumer sees exactly the stream it would see without prefetch: same items, same order,
and an exception raised while producing item k (by the source or by `to_device`) is raised
by the consumer's k-th `next()`, after the k good items before it, as the original exception
object (type, message, `__cause__` and traceback kept).

Thread safety of `to_device` in the trainer (`sharding.global_batch`):
`jax.make_array_from_process_local_data` (and the `jax.device_put` it reduces to on one
process) may be called from any thread in current JAX: it only places this process's data
on its own addressable devices and runs no cross-process collective, so one producer thread
per process cannot deadlock a multi-host run. Flax's logical axis rules and `jax.set_mesh`
are thread-local contexts that the producer thread does not inherit; `global_batch` does not
need them, since it receives the mesh and the rules explicitly.
"""
import queue
import threading
from typing import Any, Callable, Iterable, Optional, Tuple

from absl import logging

# How often a producer blocked on a full queue checks whether it was closed. `close()` also
# empties the queue, which wakes such a producer at once; the poll is the fallback.
_POLL_SECONDS = 0.05

_END = object()  # Queued after the source's last item.


class _Raised:
  """An exception of the producer, queued to be raised by the consumer in stream order."""

  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetch:
  """Iterates `(item, to_device(item))` for the items of `source`, computed ahead.

  Args:
    source: iterable of host items (e.g. numpy batches).
    to_device: host item -> device item (e.g. a sharded global `jax.Array` batch). Runs in
      the background thread when `size > 0`.
    size: how many pairs to keep ready ahead of the consumer. 0 = no thread at all:
      every `next()` reads and converts one item synchronously (for debugging).
    name: the background thread's name (it shows in stack dumps and profilers).
    close_timeout: seconds `close()` waits for a producer busy inside `source` or
      `to_device` (where it cannot be interrupted) before leaving it behind as a daemon.

  The thread starts on the first `next()`, so nothing is read before the first step asks.
  Call `close()` (or use the object as a context manager) when done: it stops the thread
  even while it is blocked on a full queue. After `close()`, or once `source` has ended or
  raised, the iterator is exhausted (`StopIteration`), like a finished generator.
  """

  def __init__(self, source: Iterable[Any], to_device: Callable[[Any], Any], size: int = 2,
               *, name: str = "vlpjax-prefetch", close_timeout: float = 5.0):
    if not isinstance(size, int) or size < 0:
      raise ValueError(f"prefetch size must be an int >= 0 (0 = no prefetch), got {size!r}.")
    self.size = size
    self._source = iter(source)
    self._to_device = to_device
    self._name = name
    self._close_timeout = close_timeout
    self._stop = threading.Event()
    self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max(size, 1))
    self._thread: Optional[threading.Thread] = None
    self._exhausted = False

  @property
  def thread(self) -> Optional[threading.Thread]:
    """The producer thread; None with `size=0` or before the first `next()`."""
    return self._thread

  def __iter__(self):
    return self

  def __next__(self) -> Tuple[Any, Any]:
    if self._exhausted:
      raise StopIteration
    if not self.size:
      return self._next_now()
    if self._thread is None:
      self._thread = threading.Thread(target=self._produce, name=self._name, daemon=True)
      self._thread.start()
    entry = self._queue.get()
    if entry is _END:
      self._exhausted = True
      raise StopIteration
    if isinstance(entry, _Raised):
      self._exhausted = True
      raise entry.error
    return entry

  def _next_now(self) -> Tuple[Any, Any]:
    """size=0: one item read and converted here, in the caller's thread."""
    try:
      item = next(self._source)
      return item, self._to_device(item)
    except BaseException:
      self._exhausted = True  # As with a thread: nothing is read after an error.
      raise

  def _produce(self) -> None:
    """The thread: reads and converts items until the source ends, fails, or `close()`."""
    try:
      while not self._stop.is_set():
        item = next(self._source, _END)
        entry = _END if item is _END else (item, self._to_device(item))
        if not self._put(entry) or entry is _END:
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by the consumer)
      self._put(_Raised(e))

  def _put(self, entry: Any) -> bool:
    """Queues `entry`, waiting for room; False if closed meanwhile."""
    while not self._stop.is_set():
      try:
        self._queue.put(entry, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def close(self) -> None:
    """Stops the producer and drops the pairs it had ready. Safe to call more than once."""
    self._exhausted = True
    self._stop.set()
    if self._thread is None:
      return
    self._drain()  # Wakes a producer waiting for room, and frees the device batches.
    self._thread.join(self._close_timeout)
    if self._thread.is_alive():
      logging.warning("%s: the thread is still inside the input pipeline after %.0f s; "
                      "leaving it behind (it is a daemon and stops after its current item).",
                      self._name, self._close_timeout)
    self._drain()

  def _drain(self) -> None:
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        return

  def __enter__(self) -> "DevicePrefetch":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
