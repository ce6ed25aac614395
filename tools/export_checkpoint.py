"""Exports the params of a training run's checkpoint (no optimizer state) to another format.

  python -m tools.export_checkpoint --workdir W --format hf_siglip --out /tmp/siglip_hf
  python -m tools.export_checkpoint --workdir W --step 5000 --format safetensors --out D \
      --dtype bfloat16

Formats (`--out` is a local directory):
  orbax        a params-only Orbax checkpoint (`vlpjax.checkpoint.load_params` reads it).
  safetensors  `model.safetensors` keyed by '/'-joined param paths ('img/encoder/...'), the
               run's config as JSON in its metadata (`vlpjax_config`) and in `config.json`.
  hf_siglip    a Hugging Face `SiglipModel` directory: `config.json`, `model.safetensors`
  hf_clip      (HF key names) and `preprocessor_config.json` (resize to the run's image size,
               mean = std = 0.5 so pixels land in [-1, 1] as vlpjax's do); loads with
               `transformers.SiglipModel.from_pretrained(DIR)` / `CLIPModel`. Two-tower runs
               only, shaped as the HF model is (`vlpjax.interop.hf_siglip_config` and
               `hf_clip_config` name what does not fit). HF texts are the vlpjax token ids as
               `input_ids`, without an attention mask.

Towers trained with `scan_layers` export to HF exactly as unscanned ones with the same weights
(the stacked blocks are sliced into HF's per-layer modules); orbax and safetensors keep the
run's own layout (`encoder/scanned/...`), which `config.init_from` converts when needed.

The model is built on this machine's devices as pure data parallel, whatever mesh the run
trained on, so a pod run exports on a CPU box. `--dtype bfloat16` halves the files (numpy has
no bf16; ml_dtypes provides it to the safetensors numpy API).
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

from flax import traverse_util
import jax
import ml_dtypes
import numpy as np

FORMATS = ("orbax", "safetensors", "hf_siglip", "hf_clip")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
SAFETENSORS_FILE = "model.safetensors"
# Pixel normalisation that maps [0, 1] to vlpjax's [-1, 1] (`value_range(-1, 1)`).
_HALF = [0.5, 0.5, 0.5]


def _export_overrides():
  """A single-process, pure data-parallel build on the local devices (no pod mesh needed).

  The batch size only shapes the init's dummy inputs: one example per device always divides.
  """
  return ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1",
          f"global_batch_size={jax.local_device_count()}", "grad_accum_steps=1"]


def _is_float(x: np.ndarray) -> bool:
  return np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16


def cast_floats(tree, dtype):
  """Every floating leaf of `tree` as a numpy `dtype` array; other leaves as they are."""
  return jax.tree.map(lambda x: np.asarray(x).astype(dtype) if _is_float(np.asarray(x))
                      else np.asarray(x), tree)


def _hf_converters(fmt: str):
  # pylint: disable=g-import-not-at-top
  from vlpjax.interop import hf_clip, hf_siglip
  if fmt == "hf_siglip":
    return hf_siglip.hf_siglip_config, hf_siglip.hf_siglip_from_params, "SiglipImageProcessor"
  return hf_clip.hf_clip_config, hf_clip.hf_clip_from_params, "CLIPImageProcessor"


def preprocessor_config(processor: str, image_size: int) -> Dict[str, Any]:
  """HF image processor settings matching vlpjax's eval pp `resize(S)|value_range(-1, 1)`."""
  return dict(
      image_processor_type=processor, do_convert_rgb=True, do_resize=True,
      size=dict(height=image_size, width=image_size), resample=2,  # PIL bilinear.
      do_center_crop=False, crop_size=dict(height=image_size, width=image_size),
      do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=_HALF,
      image_std=_HALF)


def _write_json(path: str, content) -> None:
  with open(path, "w") as f:
    f.write(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n")


def _save_safetensors(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  # np.array, not np.ascontiguousarray: that one turns 0-d arrays (logit_scale) into 1-d.
  save_file({k: np.array(v, order="C") for k, v in tensors.items()}, path, metadata=metadata)
  # safetensors creates the file owner-only (0600); an export is meant to be shared, so give
  # it the permissions any other new file would get under the user's umask.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _check_args(fmt: str, dtype: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")


def _summary(out: str, params, files: Sequence[str]) -> None:
  leaves = jax.tree.leaves(params)
  count = sum(int(np.size(x)) for x in leaves)
  nbytes = sum(int(np.asarray(x).nbytes) for x in leaves)
  print(f"exported {count:,} params ({nbytes:,} bytes of arrays) to {out}:")
  for name in files:
    path = os.path.normpath(os.path.join(out, name))
    print(f"  {path} ({_disk_bytes(path):,} bytes)")


def _disk_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, names in os.walk(path) for f in names)


def export(workdir: str, out: str, fmt: str, step: Optional[int] = None,
           dtype: str = "float32") -> str:
  """Writes checkpoint `step` (default: latest) of `workdir` to `out` in `fmt`; returns `out`."""
  # pylint: disable=g-import-not-at-top  (TensorFlow and the models load only when used)
  from vlpjax import checkpoint as checkpoint_lib
  from vlpjax import config as config_lib
  from vlpjax import trainer
  from vlpjax import workdir as workdir_lib
  _check_args(fmt, dtype)
  if os.path.isdir(out) and os.listdir(out):
    raise ValueError(f"--out {out} exists and is not empty; give a new directory.")
  run_config = workdir_lib.read_config(workdir)
  hf_config = None
  if fmt.startswith("hf_"):
    if run_config.family != "two_tower" or run_config.model_name != "two_tower":
      raise ValueError(f"--format {fmt} exports two-tower models only; {workdir} trains "
                       f"family {run_config.family!r} (model {run_config.model_name!r}).")
    config_fn, state_dict_fn, processor = _hf_converters(fmt)
    # Before reading any array: a model HF cannot express fails here, naming the key.
    hf_config = config_fn(run_config.model.to_dict(), run_config.input.image_size)

  setup = trainer.build(workdir_lib.read_config(workdir, _export_overrides()))
  params, step = workdir_lib.restore_params(workdir, setup, step)
  params = jax.tree.map(np.asarray, jax.device_get(params))
  out_params = cast_floats(params, DTYPES[dtype])

  if fmt == "orbax":
    # `out` itself is the params directory: what `config.init_from` and `load_params` take.
    # Orbax creates it (and refuses an existing one, even empty).
    if os.path.isdir(out):
      os.rmdir(out)
    checkpoint_lib.save_params(out, out_params)
    files = ["."]
  elif fmt == "safetensors":
    os.makedirs(out, exist_ok=True)
    config_text = json.dumps(run_config.to_dict(), sort_keys=True, default=str)
    _save_safetensors(os.path.join(out, SAFETENSORS_FILE),
                      traverse_util.flatten_dict(out_params, sep="/"),
                      {"format": "vlpjax", "step": str(step), "vlpjax_config": config_text})
    config_lib.save_json(run_config, os.path.join(out, "config.json"))
    files = [SAFETENSORS_FILE, "config.json"]
  else:
    os.makedirs(out, exist_ok=True)
    state_dict = cast_floats(state_dict_fn(params), DTYPES[dtype])
    _write_json(os.path.join(out, "config.json"),
                dict(hf_config, torch_dtype=dtype, dtype=dtype))
    # transformers reads safetensors files whose metadata says format "pt".
    _save_safetensors(os.path.join(out, SAFETENSORS_FILE), state_dict, {"format": "pt"})
    _write_json(os.path.join(out, "preprocessor_config.json"),
                preprocessor_config(processor, run_config.input.image_size))
    files = ["config.json", SAFETENSORS_FILE, "preprocessor_config.json"]
  print(f"checkpoint step {step} of {workdir}, format {fmt}, {dtype}")
  _summary(out, out_params, files)
  return out


def read_safetensors_export(path: str):
  """(params as nested dicts of numpy arrays, run config dict) of a `safetensors` export."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  file = os.path.join(path, SAFETENSORS_FILE) if os.path.isdir(path) else path
  with safe_open(file, framework="np") as f:
    flat = {tuple(k.split("/")): f.get_tensor(k) for k in f.keys()}
    metadata = f.metadata() or {}
  if metadata.get("format") != "vlpjax":
    raise ValueError(f"{file} is not a vlpjax safetensors export (metadata format "
                     f"{metadata.get('format')!r}).")
  return traverse_util.unflatten_dict(flat), json.loads(metadata["vlpjax_config"])


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.export_checkpoint",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a vlpjax.train workdir")
  parser.add_argument("--step", type=int, default=None, help="default: the latest")
  # hf-siglip and hf_siglip both work (dashes are how many CLIs spell it).
  parser.add_argument("--format", required=True, choices=FORMATS,
                      type=lambda name: name.replace("-", "_"))
  parser.add_argument("--out", required=True, help="output directory (local)")
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
  args = parser.parse_args(argv)
  try:
    export(args.workdir, args.out, args.format, step=args.step, dtype=args.dtype)
  except ValueError as e:  # ConfigError included: what cannot be exported, and why.
    print(f"Error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
