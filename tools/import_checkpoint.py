"""Converts a Hugging Face SigLIP or CLIP checkpoint into vlpjax TwoTower params to train from.

  python -m tools.import_checkpoint --hf /ckpt/siglip-base-patch16-224 --out /ckpt/siglip_b16
  python -m tools.import_checkpoint --hf DIR --out PARAMS_DIR --image_size 384
  python -m tools.import_checkpoint --hf DIR --out PARAMS_DIR --scan_layers

`--hf` is a `save_pretrained` directory (`config.json` with `model_type` "siglip" or "clip",
`model.safetensors` or its shards; torch is not needed). `PARAMS_DIR` becomes a params-only
Orbax checkpoint (`vlpjax.checkpoint.load_params`) plus `model.json`, the TwoTower kwargs of
the converted model. `--image_size` other than the checkpoint's resamples the learned image
position embedding to the new patch grid (`vlpjax.interop.resample_posemb`). `--scan_layers`
writes both towers' encoder blocks stacked for a `scan_layers=True` model (and sets it in the
kwargs); without it `config.init_from` still stacks them when the run's model scans. The tool
prints the config lines that start a run from it (`config.init_from`) and the LiT variant.

The HF model's tokenizer defines its text ids: a run from it must feed texts tokenized the
same way (a CLIP text tower pools at the EOS token, so its texts must carry one).
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

MODEL_FILE = "model.json"


def _converters(model_type: Optional[str]):
  # pylint: disable=g-import-not-at-top
  from vlpjax.interop import hf_clip, hf_siglip
  if model_type == "siglip":
    return hf_siglip.twotower_kwargs_from_hf_config, hf_siglip.params_from_hf_siglip
  if model_type == "clip":
    return hf_clip.twotower_kwargs_from_hf_clip_config, hf_clip.params_from_hf_clip
  raise ValueError(f"HF config model_type {model_type!r} is not supported; supported: "
                   f"siglip, clip.")


def _resize_image_tower(params, model_kwargs, hf_image_size: int, image_size: int) -> None:
  """Resamples the image position embedding in place for `image_size` images."""
  from vlpjax.interop import _hf_common, posemb  # pylint: disable=g-import-not-at-top
  patch = model_kwargs["image"]["patch_size"]
  side = _hf_common.image_grid(image_size, patch)
  table = params["img"]["position_embedding"]
  table["embedding"] = posemb.resample_posemb(table["embedding"], side * side)
  print(f"image position embedding resampled from {hf_image_size}px "
        f"({(hf_image_size // patch) ** 2} patches) to {image_size}px ({side * side} patches)")


def import_hf(hf_dir: str, out: str, image_size: Optional[int] = None,
              scan_layers: bool = False) -> Dict[str, Any]:
  """Converts the HF checkpoint in `hf_dir` into params at `out`; returns the TwoTower kwargs.

  `scan_layers`: lay the encoder blocks out for (and configure) a scanned TwoTower.
  """
  # pylint: disable=g-import-not-at-top  (JAX and Orbax load only when used)
  import jax
  from vlpjax import checkpoint as checkpoint_lib
  from vlpjax.interop import _hf_common, hf_lm
  hf_config = hf_lm.read_hf_config(hf_dir)
  kwargs_fn, params_fn = _converters(hf_config.get("model_type"))
  model_kwargs = kwargs_fn(hf_config, scan_layers=scan_layers)
  if os.path.exists(out):
    raise ValueError(f"--out {out} already exists; give a new directory.")
  params = params_fn(hf_lm.read_safetensors(hf_dir), hf_config, scan_layers=scan_layers)
  missing = {"img", "txt", "logit_scale"} - set(params)
  if missing:
    raise ValueError(f"{hf_dir} holds no {sorted(missing)}: a full two-tower checkpoint "
                     f"(SiglipModel / CLIPModel) is needed.")

  hf_image_size = _hf_common.hf_square_size(hf_config["vision_config"], "image_size")
  image_size = image_size or hf_image_size
  if image_size != hf_image_size:
    _resize_image_tower(params, model_kwargs, hf_image_size, image_size)
  checkpoint_lib.save_params(out, params)
  with open(os.path.join(out, MODEL_FILE), "w") as f:
    f.write(json.dumps(model_kwargs, indent=2, sort_keys=True) + "\n")

  count = sum(int(x.size) for x in jax.tree.leaves(params))
  print(f"wrote {count:,} params ({hf_config['model_type']}) to {out} and "
        f"{os.path.join(out, MODEL_FILE)}")
  print("Start a run from them with these config lines:")
  print('  c.family = c.model_name = "two_tower"')
  print(f"  c.model = {model_kwargs!r}")
  print(f"  c.input.image_size = {image_size}")
  print(f"  c.input.text_length = {model_kwargs['text']['max_len']}  # at most")
  print(f"  c.init_from = dict(path={os.path.abspath(out)!r})")
  print('LiT (train the text tower on the frozen image tower): c.optim.freeze = "img/.*"')
  return model_kwargs


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.import_checkpoint",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf", required=True, help="HF SigLIP / CLIP save_pretrained dir")
  parser.add_argument("--out", required=True, help="new params directory")
  parser.add_argument("--image_size", type=int, default=None,
                      help="train at this resolution (default: the checkpoint's)")
  parser.add_argument("--scan_layers", action="store_true",
                      help="stack the encoder blocks for a scan_layers=True TwoTower")
  args = parser.parse_args(argv)
  try:
    import_hf(args.hf, args.out, image_size=args.image_size, scan_layers=args.scan_layers)
  except ValueError as e:  # An unsupported or malformed HF checkpoint: say what and where.
    print(f"Error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
