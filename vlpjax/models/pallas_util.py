"""What vlpjax's Pallas (Triton) kernels share: running them in Pallas' interpreter.

`interpret()` runs every vlpjax kernel (short_attention, layer_norm) through Pallas'
interpreter on any backend, for tests on CPU. Like `attention.compile_target`, it acts when a
function is traced: JAX's trace cache does not see it.
"""
import contextlib
from typing import Iterator

_INTERPRET = {"on": False}


@contextlib.contextmanager
def interpret() -> Iterator[None]:
  """Within: the kernels run in Pallas' interpreter (any backend; for tests on CPU)."""
  saved = _INTERPRET["on"]
  _INTERPRET["on"] = True
  try:
    yield
  finally:
    _INTERPRET["on"] = saved


def interpreting() -> bool:
  return _INTERPRET["on"]
