"""What a compiled GPU step's kernels cost: a per-kernel roofline over its optimized HLO.

Each kernel (every fusion, custom call and copy that is not a view; a loop's once per iteration)
costs the larger of its bytes over the memory bandwidth and its matmul FLOPs over the matmul
rate, plus a launch. It reads no caches and overlaps nothing, so it is a model, not a
measurement: good for comparing two compiles of one step and for finding the kernels that move
the most bytes. tools/gpu_compile.py runs it on a step compiled for a GPU without one;
`--from_hlo` on a step compiled elsewhere.

`gpu` arguments need `memory_bytes_per_s` and `bf16_flops_per_s` (gpu_compile.GpuTarget).
"""
import collections
import dataclasses
import re
from typing import Any, Dict, List

from tools import profile_summary
from vlpjax.models import short_attention

# Fractions of the spec-sheet rates that kernels reached on the H100 lent on 2026-11-24
# (docs/benchmarks.md): cuBLAS matmuls ~700 of 989 TFLOP/s, element-wise kernels ~3.0 of 3.35
# TB/s, cuDNN's fused attention ~100 TFLOP/s on 196- and 64-token sequences (fwd + bwd,
# helpers included; longer sequences do better). vlpjax's Pallas attention kernels are charged
# the same rate per FLOP: no card has timed them yet. LAUNCH_SECONDS: a kernel's fixed cost.
EFFICIENCY = {"matmul": 0.71, "memory": 0.9, "attention": 0.10}
LAUNCH_SECONDS = 2e-6

_VIEWS = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all",
          "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SUBCOMPUTATIONS = re.compile(r"(?:body|condition|calls|branch_computations)=\{?%?([\w.\-]+)")
_ARRAY = re.compile(r"(pred|s4|u4|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128|"
                    r"f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}


def _elements(dims: str) -> int:
  count = 1
  for d in dims.split(","):
    if d:
      count *= int(d)
  return count


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape ('bf16[2,3]', '(f32[4], s32[])'), tuples summed."""
  return sum(_elements(dims) * _BYTES[dtype] for dtype, dims in _ARRAY.findall(shape))


def dot_flops(dot: profile_summary.HloInstruction, instructions) -> float:
  """2 x output elements x contracted size."""
  (out_dims,) = [dims for _, dims in _ARRAY.findall(dot.shape)][:1] or [""]
  lhs = instructions.get(dot.operands[0]) if dot.operands else None
  if lhs is None:
    return 0.0
  lhs_dims = [int(d) for d in _ARRAY.findall(lhs.shape)[0][1].split(",") if d]
  contracted = 1
  for axis in dot.lhs_contracting:
    contracted *= lhs_dims[axis]
  return 2.0 * _elements(out_dims) * contracted


def attention_flops(call: profile_summary.HloInstruction, instructions) -> float:
  """A fused-attention call's matmul FLOPs, 2 B H Lq Lk D per [Lq, Lk, D] matmul: cuDNN's
  forward runs two, its backward five; vlpjax's Pallas kernels as `short_attention` counts."""
  q = instructions.get(call.operands[0]) if call.operands else None
  k = instructions.get(call.operands[1]) if len(call.operands) > 1 else None
  if q is None or k is None:
    return 0.0
  # [B, L, heads, head_dim] (cuDNN's BTNH layout, the one attention.py passes).
  batch, q_len, heads, head_dim = (int(d) for d in _ARRAY.findall(q.shape)[0][1].split(","))
  k_len = int(_ARRAY.findall(k.shape)[0][1].split(",")[1])
  matmuls = short_attention.KERNEL_MATMULS.get(call.kernel) or (
      5 if "backward" in (call.target or "").lower() else 2)
  return 2.0 * batch * heads * q_len * k_len * head_dim * matmuls


@dataclasses.dataclass
class Kernel:
  name: str
  kind: str           # profile_summary.KINDS
  bytes: float        # operands read + results written, all launches
  flops: float        # matmul FLOPs (dots, fused attention), all launches
  seconds: float      # the estimate, all launches
  op_name: str        # the JAX op it came from
  launches: int = 1   # per step: a loop body's kernels run once per iteration


def kernels(hlo_text: str, gpu: Any) -> List[Kernel]:
  """Every kernel the entry computation (and the loops it runs) launches, with its estimate.

  A while loop's kernels count once per iteration where XLA knows the trip count (a scan over
  layers, gradient accumulation), else once.
  """
  instructions, computations = profile_summary.parse_hlo(hlo_text)
  entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo_text, re.MULTILINE)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  parameters = _parameter_numbers(hlo_text)
  found, seen = [], set()
  pending = [(entry.group(1), 1)]  # (computation, times it runs per step)
  matmul_rate = gpu.bf16_flops_per_s * EFFICIENCY["matmul"]
  attention_rate = gpu.bf16_flops_per_s * EFFICIENCY["attention"]
  bandwidth = gpu.memory_bytes_per_s * EFFICIENCY["memory"]
  while pending:
    computation, runs = pending.pop()
    if computation in seen:
      continue
    seen.add(computation)
    for name in computations.get(computation, ()):
      op = instructions[name]
      if op.opcode in ("while", "conditional", "call"):
        line = _line_of(hlo_text, name)
        trips = _TRIP_COUNT.search(line) if op.opcode == "while" else None
        called_runs = runs * (int(trips.group(1)) if trips else 1)
        pending.extend((called, called_runs) for called in _SUBCOMPUTATIONS.findall(line))
        continue
      if op.opcode in _VIEWS or op.opcode.endswith(("-done", "-update")):
        continue
      kind = profile_summary.classify(op, instructions, computations)
      cublas = (op.target or "").startswith("__cublas")
      moved = _bytes_moved(op, instructions, computations, parameters)
      flops, rate = 0.0, matmul_rate
      if kind == "attention":
        flops, rate = attention_flops(op, instructions), attention_rate
      elif kind == "matmul":
        dots = [op] if op.opcode == "dot" or cublas else [
            i for i in profile_summary._instructions_within(op.calls or "", instructions,
                                                             computations)
            if i.opcode == "dot"]
        flops = sum(dot_flops(d, instructions) for d in dots)
      seconds = max(moved / bandwidth, flops / rate) + LAUNCH_SECONDS
      found.append(Kernel(name, kind, moved * runs, flops * runs, seconds * runs, op.op_name,
                          runs))
  return found


def _parameter_numbers(hlo_text: str) -> Dict[str, int]:
  """{name: n} of every `parameter(n)` instruction (names are unique within a module)."""
  return {m.group(1): int(m.group(2)) for m in re.finditer(
      r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=[^\n]*?\sparameter\((\d+)\)", hlo_text, re.MULTILINE)}


def _bytes_moved(op: profile_summary.HloInstruction, instructions, computations,
                 parameters: Dict[str, int]) -> float:
  """Operands read plus results written by one kernel.

  Whole arrays, except where XLA touches a part: an operand a fusion only dynamic-slices is
  read as the slices (a scan reading one layer's stacked weights), and a dynamic-update-slice
  writes its update into the buffer in place (a scan stacking one layer's activations), so
  neither the buffer's read nor its full write counts. A cuBLAS call's result is (product,
  workspace); the workspace is scratch.
  """
  if (op.target or "").startswith("__cublas"):
    written = shape_bytes(_ARRAY.search(op.shape).group(0))
    return written + sum(shape_bytes(instructions[o].shape) for o in op.operands
                         if o in instructions)
  inner = ([instructions[n] for n in computations.get(op.calls, ())]
           if op.opcode == "fusion" and op.calls else [])
  if not inner:  # An unfused op: its operands are its parameters.
    inner, names = [op], list(op.operands)
  else:
    names = [None] * len(op.operands)
    for i in inner:
      if i.opcode == "parameter" and parameters.get(i.name, -1) < len(names):
        names[parameters[i.name]] = i.name
  users: Dict[str, List[profile_summary.HloInstruction]] = collections.defaultdict(list)
  for i in inner:
    for o in i.operands:
      users[o].append(i)
  root = inner[-1]  # HLO text lists a computation's root last.
  results = ([instructions[o] for o in root.operands if o in instructions]
             if root.opcode == "tuple" else [root])
  in_place = {r.operands[0] for r in results if r.opcode == "dynamic-update-slice"}
  written = sum(shape_bytes(instructions[r.operands[1]].shape)
                if r.opcode == "dynamic-update-slice" and r.operands[1] in instructions
                else shape_bytes(r.shape) for r in results)
  read = 0.0
  for operand, name in zip(op.operands, names):
    if operand not in instructions or name in in_place:
      continue
    sliced = users.get(name, [])
    if sliced and all(u.opcode == "dynamic-slice" and u.operands[0] == name for u in sliced):
      read += sum(shape_bytes(u.shape) for u in sliced)
    else:
      read += shape_bytes(instructions[operand].shape)
  return read + written


def _line_of(hlo_text: str, name: str) -> str:
  match = re.search(rf"^\s*(?:ROOT\s+)?%?{re.escape(name)}\s*=.*$", hlo_text, re.MULTILINE)
  return match.group(0) if match else ""


def op_group(op_name: str) -> str:
  """A kernel's place in the model, all layers together:
  'jit(train_step)/transpose(jvp(TwoTower))/img/layers_7/mlp/add'
  -> 'bwd TwoTower/img/layers_N/mlp/add'.

  The jit wrapper names the step, not a place in the model, so it is dropped; transformation
  wrappers around the module name are peeled off (transpose(...) marks the backward pass).
  """
  if not op_name:
    return "(no JAX op: optimizer, copies)"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  path = []
  for part in op_name.split("/"):
    if part.startswith("jit("):
      continue
    while (peeled := re.fullmatch(r"[a-z_]+\((.*)\)", part)):
      part = peeled.group(1)
    path.append(part)
  # Inside jax.checkpoint the name stack starts again from the model: keep the inner one.
  if path and path[0] in path[1:]:
    path = path[len(path) - 1 - path[::-1].index(path[0]):]
  return f"{direction} " + re.sub(r"layers_\d+", "layers_N", "/".join(path))


def summarize(found: List[Kernel], model_flops: float, gpu: Any, top: int = 15
              ) -> Dict[str, Any]:
  total = sum(k.seconds for k in found)
  by_kind: Dict[str, Dict[str, float]] = {}
  for k in found:
    row = by_kind.setdefault(k.kind, {"seconds": 0.0, "kernels": 0, "bytes": 0.0})
    row["seconds"] += k.seconds
    row["kernels"] += k.launches
    row["bytes"] += k.bytes
  groups: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
  for k in found:
    group = groups[f"{k.kind}: {op_group(k.op_name)}"]
    group[0] += k.seconds
    group[1] += k.launches
  return {
      "estimated_step_seconds": total,
      "estimated_mfu": model_flops / total / gpu.bf16_flops_per_s if total else 0.0,
      "kernels": sum(k.launches for k in found),
      "bytes_moved": sum(k.bytes for k in found),
      "matmul_flops": sum(k.flops for k in found),
      "by_kind": {kind: dict(row, share=row["seconds"] / total)
                  for kind, row in sorted(by_kind.items(), key=lambda kv: -kv[1]["seconds"])},
      "top_groups": [{"group": g, "seconds": s, "kernels": n}
                     for g, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]],
      "efficiency": dict(EFFICIENCY, launch_seconds=LAUNCH_SECONDS),
  }


def format_estimate(est: Dict[str, Any], model_flops: float) -> str:
  lines = [
      f"estimate (a model, not a measurement): {est['estimated_step_seconds'] * 1e3:.1f} ms "
      f"per step, {est['kernels']} kernels moving {est['bytes_moved'] / 1e9:.1f} GB; model "
      f"FLOPs {model_flops / 1e12:.2f} T -> MFU {est['estimated_mfu']:.1%}",
      "  kind           ms   share  kernels      GB",
  ]
  for kind, row in est["by_kind"].items():
    lines.append(f"  {kind:<12} {row['seconds'] * 1e3:6.2f} {row['share']:6.1%} "
                 f"{row['kernels']:8d} {row['bytes'] / 1e9:7.1f}")
  lines.append("  costliest groups of kernels (layers_N: all layers together):")
  for row in est["top_groups"]:
    lines.append(f"  {row['seconds'] * 1e3:7.2f} ms {row['kernels']:4d}x  {row['group']}")
  return "\n".join(lines)
