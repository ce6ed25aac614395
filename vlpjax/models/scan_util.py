"""Converting param trees between unscanned (`layers_{i}`) and scanned (`scanned`) layer stacks.

A stack of transformer blocks is stored one of two ways under its parent module (an
`Encoder`'s `encoder`, a `DecoderStack`'s `layers`):

  unscanned  `layers_0`, ..., `layers_{n-1}`: one subtree per block;
  scanned    `scanned`: one subtree whose every leaf has a leading axis of size n (the
             `layers` logical axis), block i being `leaf[i]` (`nn.scan` over the blocks).

Both hold the same numbers, so a checkpoint of either layout fits a model of the other after
`stack_layers` / `unstack_layers`. Checkpoint conversion (`vlpjax.interop`), `config.init_from`
and tests use these; the models never do. Trees are nested mappings of arrays (numpy or jax;
boxed leaves such as `nn.Partitioned` are not supported: `nn.unbox` first). Other keys of a
parent (an encoder's `encoder_norm`) are kept as they are.
"""
import re
from typing import Any, Dict, List, Mapping, Optional

import jax
import numpy as np

SCANNED = "scanned"
_LAYER = re.compile(r"layers_(\d+)")


def _layer_indices(node: Mapping[str, Any]) -> Dict[int, str]:
  """{i: "layers_i"} for the block keys of one mapping."""
  found = {}
  for key in node:
    match = _LAYER.fullmatch(str(key))
    if match:
      found[int(match.group(1))] = key
  return found


def _stack(node: Mapping[str, Any], where: str) -> Dict[str, Any]:
  """One parent's `layers_{i}` -> `scanned` (leaves stacked on a new leading axis)."""
  found = _layer_indices(node)
  if SCANNED in node:
    raise ValueError(f"{where or 'tree'} has both {SCANNED!r} and layers_* entries.")
  if sorted(found) != list(range(len(found))):
    raise ValueError(f"{where or 'tree'} has layers {sorted(found)}: a scanned stack needs "
                     f"layers_0 .. layers_{len(found) - 1}, none missing.")
  blocks = [node[found[i]] for i in range(len(found))]
  structure = jax.tree_util.tree_structure(blocks[0])
  for i, block in enumerate(blocks[1:], 1):
    if jax.tree_util.tree_structure(block) != structure:
      raise ValueError(f"{where}/layers_{i} has other params than {where}/layers_0: "
                       f"blocks of different shapes cannot be stacked.")
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                   *blocks)
  rest = {k: v for k, v in node.items() if k not in found.values()}
  return {**rest, SCANNED: stacked}


def _unstack(node: Mapping[str, Any], where: str) -> Dict[str, Any]:
  """One parent's `scanned` -> `layers_{i}` (leaves sliced along their leading axis)."""
  if _layer_indices(node):
    raise ValueError(f"{where or 'tree'} has both {SCANNED!r} and layers_* entries.")
  scanned = node[SCANNED]
  depths = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(scanned)}
  if len(depths) != 1 or None in depths:
    raise ValueError(f"{where}/{SCANNED} leaves do not share one leading layers axis "
                     f"(leading sizes {sorted(map(str, depths))}).")
  depth = depths.pop()
  rest = {k: v for k, v in node.items() if k != SCANNED}
  layers = {f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], scanned)
            for i in range(depth)}
  return {**rest, **layers}


def _join(where: str, key: str) -> str:
  return f"{where}/{key}" if where else str(key)


def _is_mapping(node) -> bool:
  return isinstance(node, Mapping)


def stack_layers(tree: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
  """Every unscanned stack in `tree` (`layers_0..layers_{n-1}`) as a scanned one (`scanned`).

  Returns a new tree of plain dicts; the stacked leaves are numpy arrays. `where` prefixes
  the paths named in errors.
  """
  node = dict(tree)
  if _layer_indices(node):
    node = _stack(node, where)
  return {k: stack_layers(v, _join(where, k)) if _is_mapping(v) and k != SCANNED else v
          for k, v in node.items()}


def unstack_layers(tree: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
  """Every scanned stack in `tree` (`scanned`) as `layers_0..layers_{n-1}`; `stack_layers`'s
  inverse."""
  node = dict(tree)
  if SCANNED in node and _is_mapping(node[SCANNED]):
    node = _unstack(node, where)
  return {k: unstack_layers(v, _join(where, k)) if _is_mapping(v) else v
          for k, v in node.items()}


def is_scanned(tree: Mapping[str, Any]) -> bool:
  """Whether a stack's parent subtree (e.g. an `encoder`'s params) holds a scanned stack."""
  return SCANNED in tree


def match_layers(source: Mapping[str, Any], like: Mapping[str, Any], where: str = "",
                 converted: Optional[List[str]] = None) -> Dict[str, Any]:
  """`source` with each layer stack in the layout that the same stack has in `like`.

  Walks both trees together: where `like` holds `scanned` and `source` holds `layers_{i}`
  (or the other way round) under the same parent, that parent of `source` is converted;
  everything else, including subtrees `like` lacks, is kept. `like` may be any tree of the
  target's structure (arrays, shapes, boxed params). The path of each converted parent and
  its new layout ("img/encoder -> scanned") is appended to `converted` when given.
  """
  node = dict(source)
  like_scanned = SCANNED in like
  like_unscanned = bool(_layer_indices(like))
  if like_scanned and not like_unscanned and _layer_indices(node) and SCANNED not in node:
    node = _stack(node, where)
    if converted is not None:
      converted.append(f"{where or '.'} -> {SCANNED}")
  elif like_unscanned and not like_scanned and SCANNED in node and not _layer_indices(node):
    node = _unstack(node, where)
    if converted is not None:
      converted.append(f"{where or '.'} -> layers_*")
  out = {}
  for key, value in node.items():
    other = like.get(key)
    if _is_mapping(value) and _is_mapping(other):
      out[key] = match_layers(value, other, _join(where, key), converted)
    else:
      out[key] = value
  return out
