"""Where a compiled step's time goes, from a `jax.profiler` trace: op time by kind of work.

  python -m tools.profile_summary TRACE_DIR --hlo step.hlo.txt --steps 12 [--out summary.json]

`tools.benchmark train --profile DIR` writes the trace and the compiled step's HLO there and
puts this summary in its JSON, so one run on a lent GPU returns the table that a person would
otherwise read off TensorBoard's trace viewer kernel by kernel (docs/benchmarks.md, "On an
accelerator", was read that way).

How: every op event of the step's module in the trace carries the HLO instruction's name
(`hlo_op`: XLA:CPU's thunks, a GPU's kernels, TPU ops alike). The compiled HLO says what
each instruction is, so the kind is read from the program rather than guessed from kernel
names: a fusion holding a dot is `matmul` (cuBLAS, Triton and YNNPACK alike), a cuDNN
fused-attention call is `attention`, a fusion holding a reduce is `reduction`, one that only
moves data is `layout`, and so on (`KINDS`). Control ops (`while`, `call`, ...) are left out
of the sums: the ops they run are counted themselves.

Checked here on XLA:CPU traces, and on GPU-shaped traces and HLO written by hand (kernels on
"Stream" lines of a `/device:GPU:N` plane, cuBLAS / cuDNN custom calls, Triton GEMM fusions):
tests/test_profile_summary.py. A real GPU trace is read for the first time in the next
session lent one; ops the HLO does not name are listed (`ops_not_in_hlo`), not guessed.

Figures per train step (`--steps` is how many the trace holds):
  op_seconds    summed op durations; on CPU both cores' ops add up, so it can exceed the wall
  busy_seconds  time during which some op ran (the union over all threads or streams); on
                CPU a lower bound: XLA:CPU's thread pool runs some of an op's work after the
                op's event has ended (docs/benchmarks.md)
  span_seconds  from the first op's start to the last op's end, over the executions
  by_kind       op seconds, share of op_seconds and op count per kind
  top_ops       the costliest instructions: name, kind, result shape, seconds per step
"""
import argparse
import dataclasses
import glob
import json
import os
import re
import sys
from typing import Dict, Iterable, List, Optional, Tuple

KINDS = ("matmul", "attention", "convolution", "reduction", "element-wise", "layout",
         "collective", "other")
_CONTROL = {"while", "call", "conditional", "async-start", "async-update", "async-done"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all", "collective-broadcast", "send", "recv")
# Ops that move or view data without arithmetic: a fusion of only these is a layout change.
_DATA_MOVEMENT = {"parameter", "constant", "bitcast", "reshape", "transpose", "copy",
                  "broadcast", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate",
                  "pad", "tuple", "get-tuple-element", "iota", "reverse", "gather", "scatter",
                  "bitcast-convert"}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\bcalls=\{?%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
# A Triton custom call's kernel name (a Pallas call's `name`), in its backend config.
_TRITON_KERNEL = re.compile(r'\bname = "([\w.\-]+)"')
_LAYOUT = re.compile(r"\{[^{}]*\}")  # "f32[2,3]{1,0}" -> "f32[2,3]"
_COMMENT = re.compile(r"/\*.*?\*/")  # "/*index=5*/" in long tuples
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# A dot's "lhs_contracting_dims={1}"; a cuBLAS call's backend config says
# "lhs_contracting_dimensions":["1"].
_LHS_CONTRACTING = re.compile(r'lhs_contracting_dim(?:s=\{([\d,]*)\}|ensions":\[([\d",]*)\])')


@dataclasses.dataclass
class HloInstruction:
  name: str
  opcode: str
  shape: str
  calls: Optional[str] = None
  target: Optional[str] = None
  operands: Tuple[str, ...] = ()
  op_name: str = ""                 # the JAX op it came from (metadata), "" if none
  lhs_contracting: Tuple[int, ...] = ()  # a dot's
  kernel: str = ""                  # a Triton custom call's kernel name, "" otherwise


def _axes(match: Optional[re.Match]) -> Tuple[int, ...]:
  listed = (match.group(1) or match.group(2) or "") if match else ""
  return tuple(int(d) for d in re.findall(r"\d+", listed))


def _operand_names(tail: str) -> Tuple[str, ...]:
  """'add(%a, %b), metadata=...' -> ('a', 'b'): the names inside the opcode's parentheses."""
  start = tail.find("(")
  if start < 0:
    return ()
  depth = 0
  for end in range(start, len(tail)):
    depth += {"(": 1, ")": -1}.get(tail[end], 0)
    if depth == 0:
      return tuple(_OPERAND.findall(tail[start + 1:end]))
  return ()


def _split_shape(rest: str) -> Tuple[str, str]:
  """'f32[2,3]{1,0} add(...)' -> ('f32[2,3]{1,0}', 'add(...)'); tuples keep their parens."""
  if rest.startswith("("):
    depth = 0
    for i, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _short_shape(shape: str) -> str:
  """Without layouts and comments; a long tuple as its element count."""
  shape = _COMMENT.sub("", _LAYOUT.sub("", shape))
  return shape if len(shape) <= 80 else f"({shape.count('[')} arrays)"


def parse_hlo(text: str) -> Tuple[Dict[str, HloInstruction], Dict[str, List[str]]]:
  """Instructions by name, and each computation's instruction names, from HLO text."""
  instructions: Dict[str, HloInstruction] = {}
  computations: Dict[str, List[str]] = {}
  current: Optional[List[str]] = None
  for line in text.splitlines():
    if line[:1].isspace():  # Instructions are indented; computations' headers and ends not.
      match = _INSTRUCTION.match(line)
      if match and current is not None:
        shape, tail = _split_shape(match.group(2))
        opcode = tail.partition("(")[0].strip()
        calls, target = _CALLS.search(tail), _TARGET.search(tail)
        op_name, contracting = _OP_NAME.search(tail), _LHS_CONTRACTING.search(tail)
        kernel = _TRITON_KERNEL.search(tail) if target and "triton" in target.group(1) else None
        instructions[match.group(1)] = HloInstruction(
            match.group(1), opcode, _short_shape(shape),
            calls.group(1) if calls else None, target.group(1) if target else None,
            _operand_names(_COMMENT.sub("", tail)), op_name.group(1) if op_name else "",
            _axes(contracting), kernel.group(1) if kernel else "")
        current.append(match.group(1))
    elif line.rstrip().endswith("{") and _COMPUTATION.match(line):
      current = computations.setdefault(_COMPUTATION.match(line).group(1), [])
    elif line.strip() == "}":
      current = None
  return instructions, computations


def _target_kind(target: str) -> str:
  target = target.lower()
  if "fmha" in target or "attention" in target or "flash" in target:
    return "attention"
  if "conv" in target:
    return "convolution"
  if any(word in target for word in ("gemm", "matmul", "dot", "cublas")):
    return "matmul"
  if "norm" in target:  # vlpjax's Pallas LayerNorm backward (layer_norm_bwd): row reductions
    return "reduction"
  return "other"


def _instructions_within(name: str, instructions, computations, seen=None
                         ) -> Iterable[HloInstruction]:
  """The instructions of computation `name` and of the computations they call (recursively)."""
  seen = set() if seen is None else seen
  if name in seen:
    return
  seen.add(name)
  for inner_name in computations.get(name, ()):
    inner = instructions[inner_name]
    yield inner
    if inner.calls:
      yield from _instructions_within(inner.calls, instructions, computations, seen)


_REDUCTIONS = {"reduce", "reduce-window", "select-and-scatter"}


def classify(instruction: HloInstruction, instructions, computations) -> str:
  """The kind of work one instruction is ("control" for those whose ops are counted alone)."""
  opcode = instruction.opcode
  if opcode in _CONTROL:
    return "control"
  if opcode.startswith(_COLLECTIVES):
    return "collective"
  if opcode == "custom-call":
    # A Triton kernel's name says what it computes (vlpjax's Pallas kernels: short_attention_*,
    # layer_norm_bwd).
    return _target_kind(instruction.kernel or instruction.target or "")
  if opcode == "dot":
    return "matmul"
  if opcode == "convolution":
    return "convolution"
  if opcode in _REDUCTIONS:
    return "reduction"
  if opcode in _DATA_MOVEMENT:
    return "layout"
  if opcode != "fusion" or not instruction.calls:
    return "element-wise"
  return classify_called(instruction, instructions, computations)


def classify_called(instruction: HloInstruction, instructions, computations) -> str:
  """The kind of the work in the computation `instruction` calls (a fusion's body, an async
  op's wrapped computation), by its costliest sort of instruction; "other" if it calls none."""
  if not instruction.calls:
    return "other"
  inner = list(_instructions_within(instruction.calls, instructions, computations))
  opcodes = {op.opcode for op in inner}
  for op in inner:
    if op.opcode == "custom-call":
      kind = _target_kind(op.target or "")
      if kind != "other":
        return kind
  if "dot" in opcodes:
    return "matmul"
  if "convolution" in opcodes:
    return "convolution"
  if opcodes & _REDUCTIONS:
    return "reduction"
  if any(op.startswith(_COLLECTIVES) for op in opcodes):
    return "collective"
  if opcodes <= _DATA_MOVEMENT:
    return "layout"
  return "element-wise"


def module_name(hlo_text: str) -> Optional[str]:
  match = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.MULTILINE)
  return match.group(1) if match else None


@dataclasses.dataclass
class OpEvent:
  op: str
  timeline: str  # plane/line: events on one timeline do not overlap one another
  start_ns: float
  duration_ns: float


def read_trace(trace_dir: str):
  """The newest `*.xplane.pb` under `trace_dir`, as `jax.profiler.ProfileData`."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise ValueError(f"no *.xplane.pb under {trace_dir!r}: give the directory that "
                     "`jax.profiler.trace` (or `tools.benchmark train --profile`) wrote.")
  return ProfileData.from_file(files[-1])


def op_events(profile, module: str) -> List[OpEvent]:
  """Every op event of HLO module `module`: kernels on a device's streams, else host thunks.

  A GPU's device plane may also hold derived lines ("XLA Ops", "XLA Modules") built from the
  same kernels; only the stream lines are read there, so nothing is counted twice.
  """
  events: List[OpEvent] = []
  for plane in profile.planes:
    lines = list(plane.lines)
    if plane.name.startswith("/device:") and any(l.name.startswith("Stream") for l in lines):
      lines = [l for l in lines if l.name.startswith("Stream")]
    for line in lines:
      for event in line.events:
        if event.name.startswith("end: "):  # XLA:CPU's marker for an async thunk's end.
          continue
        stats = dict(event.stats)
        if "hlo_op" not in stats or stats.get("hlo_module") != module:
          continue
        events.append(OpEvent(str(stats["hlo_op"]), f"{plane.name}/{line.name}",
                              float(event.start_ns), float(event.duration_ns)))
  return events


def modules_in(profile) -> Dict[str, int]:
  """How many op events each HLO module has in the trace (to say what a trace holds)."""
  counts: Dict[str, int] = {}
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          module = str(stats.get("hlo_module"))
          counts[module] = counts.get(module, 0) + 1
  return counts


def _union_ns(intervals: List[Tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def summarize(trace_dir: str, hlo_texts: List[str], steps: int, top: int = 15) -> dict:
  """The figures the module docstring lists, per train step, for the step's module.

  `hlo_texts`: the compiled HLO of the program(s) the trace ran (the first names the module
  whose ops are read; with several train steps per call, the scanned program's).
  """
  return summarize_profile(read_trace(trace_dir), hlo_texts, steps, top, where=trace_dir)


def summarize_profile(profile, hlo_texts: List[str], steps: int, top: int = 15,
                      where: str = "the trace") -> dict:
  """`summarize` of a `jax.profiler.ProfileData` already read."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  instructions, computations = {}, {}
  for text in hlo_texts:
    parsed = parse_hlo(text)
    instructions.update(parsed[0])
    computations.update(parsed[1])
  module = module_name(hlo_texts[0])
  events = op_events(profile, module)
  if not events:
    found = sorted(modules_in(profile).items(), key=lambda item: -item[1])[:5]
    raise ValueError(f"{where} holds no op of module {module!r}: was the step run inside "
                     "the trace, and is the HLO the step's? Op events by module: "
                     + (", ".join(f"{name} ({count})" for name, count in found) or "none"))
  kinds: Dict[str, str] = {}
  unknown = set()
  per_op: Dict[str, float] = {}
  counted: List[OpEvent] = []
  for event in events:
    if event.op not in kinds:
      instruction = instructions.get(event.op)
      if instruction is None:
        unknown.add(event.op)
      kinds[event.op] = (classify(instruction, instructions, computations)
                         if instruction else "other")
    if kinds[event.op] == "control":
      # A host thunk of a loop or call spans the ops it runs, which are counted themselves.
      # On a device nothing spans other kernels: a kernel named after one (an async op's, a
      # command buffer's) is real work, of the kind of what it calls.
      if not event.timeline.startswith("/device:"):
        continue
      kinds[event.op] = classify_called(instructions[event.op], instructions, computations)
    counted.append(event)
    per_op[event.op] = per_op.get(event.op, 0.0) + event.duration_ns
  op_ns = sum(e.duration_ns for e in counted)
  by_kind = {kind: {"seconds": 0.0, "share": 0.0, "ops": 0} for kind in KINDS}
  for op, ns in per_op.items():
    by_kind[kinds[op]]["seconds"] += ns / 1e9 / steps
    by_kind[kinds[op]]["ops"] += 1
  for figures in by_kind.values():
    figures["share"] = figures["seconds"] * 1e9 * steps / op_ns
  starts = [e.start_ns for e in counted]
  ends = [e.start_ns + e.duration_ns for e in counted]
  ranked = sorted(per_op.items(), key=lambda item: -item[1])[:top]
  return {
      "module": module, "steps": steps, "timelines": len({e.timeline for e in counted}),
      "op_seconds": op_ns / 1e9 / steps,
      "busy_seconds": _union_ns([(s, e) for s, e in zip(starts, ends)]) / 1e9 / steps,
      "span_seconds": (max(ends) - min(starts)) / 1e9 / steps,
      "by_kind": by_kind,
      "top_ops": [{"op": op, "kind": kinds[op],
                   "shape": instructions[op].shape if op in instructions else None,
                   "seconds": ns / 1e9 / steps} for op, ns in ranked],
      "ops_not_in_hlo": sorted(unknown),
  }


def format_table(summary: dict) -> str:
  """The summary as lines for a terminal."""
  unit = 1e3  # ms
  lines = [f"{summary['module']}: per step {summary['op_seconds'] * unit:.2f} ms of ops, "
           f"{summary['busy_seconds'] * unit:.2f} ms busy, span "
           f"{summary['span_seconds'] * unit:.2f} ms ({summary['timelines']} timelines)"]
  for kind, figures in sorted(summary["by_kind"].items(), key=lambda kv: -kv[1]["seconds"]):
    if figures["ops"]:
      lines.append(f"  {kind:<13}{figures['seconds'] * unit:10.2f} ms  "
                   f"{figures['share']:6.1%}  {figures['ops']:5d} ops")
  lines.append("  costliest ops:")
  for op in summary["top_ops"]:
    lines.append(f"    {op['seconds'] * unit:9.3f} ms  {op['kind']:<13}{op['op']}  "
                 f"{op['shape'] or ''}")
  return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.profile_summary", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir", help="the directory a jax.profiler trace was written to")
  parser.add_argument("--hlo", required=True, action="append",
                      help="the compiled step's HLO text (`compiled.as_text()`); the first "
                      "names the module read")
  parser.add_argument("--steps", type=int, required=True,
                      help="how many train steps the trace holds")
  parser.add_argument("--top", type=int, default=15, help="how many of the costliest ops")
  parser.add_argument("--out", help="write the JSON here as well as to stdout")
  args = parser.parse_args(argv)
  texts = []
  for path in args.hlo:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  try:
    summary = summarize(args.trace_dir, texts, args.steps, args.top)
  except ValueError as e:
    print(f"profile_summary: {e}", file=sys.stderr)
    return 2
  print(format_table(summary), file=sys.stderr)
  text = json.dumps(summary, indent=2)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
