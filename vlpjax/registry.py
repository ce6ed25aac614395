"""String registries (models, losses, evaluators, preprocessing ops, schedules).

A config names components by string; a typo must fail before any work is done with
the closest valid names, so every lookup goes through `Registry.get`.
"""
import difflib
from typing import Any, Callable, Dict, List


def nearest(name: str, candidates, n: int = 3) -> List[str]:
  """The closest candidates to `name`, best first (empty if none is close)."""
  return difflib.get_close_matches(str(name), [str(c) for c in candidates], n=n, cutoff=0.5)


def unknown_name_message(kind: str, name: str, candidates) -> str:
  near = nearest(name, candidates)
  hint = f" Did you mean {' or '.join(repr(c) for c in near)}?" if near else ""
  return (f"Unknown {kind} {name!r}.{hint} "
          f"Known: {', '.join(sorted(map(str, candidates)))}.")


class UnknownNameError(KeyError):
  """A name that is not registered; the message lists the nearest known names."""

  def __str__(self):  # KeyError would print the message inside quotes.
    return str(self.args[0])


class Registry:
  """Maps names to objects; `get` errors with the nearest registered names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    def decorator(obj):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> Any:
    if name not in self._entries:
      raise UnknownNameError(unknown_name_message(self.kind, name, self._entries))
    return self._entries[name]

  def names(self) -> List[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
