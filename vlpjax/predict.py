"""Caption images with a trained checkpoint.

  python -m vlpjax.predict --workdir DIR --images a.png b.jpg [--step N] \\
      [--decode method=beam,beam_size=4,max_decode_len=24]

Reads DIR/config.json (written by `vlpjax.train`) and the latest checkpoint (or `--step`),
resizes each image to the config's `input.image_size`, and prints one caption per image.
`--decode` takes `vlpjax.decoding.DecodeConfig` fields as `key=value` pairs: method greedy |
beam | sample, beam_size, length_penalty, temperature, top_k, top_p, max_decode_len.
Works for every family that captions (CoCa, the prefix-LM VLM).
"""
import argparse
import dataclasses
import sys
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from vlpjax import config as config_lib


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
  """Files -> float32 [N, size, size, 3] in [-1, 1] (bilinear resize, as eval pp `resize`)."""
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read image {path!r}: {e}") from e
    images.append(np.asarray(image, np.float32) / 127.5 - 1.0)
  return np.stack(images)


def decode_config(spec: str, eos_id: int):
  """`key=value,...` -> DecodeConfig (types and names checked)."""
  from vlpjax import decoding  # pylint: disable=g-import-not-at-top
  fields = {f.name: f.default for f in dataclasses.fields(decoding.DecodeConfig)}
  fields["eos_id"] = eos_id
  return decoding.DecodeConfig.from_dict(config_lib.parse_arg(spec, **fields).to_dict())


def caption_images(workdir: str, paths: Sequence[str], step: Optional[int] = None,
                   decode: str = "") -> List[str]:
  """Captions of the images at `paths` from the run in `workdir`."""
  # pylint: disable=g-import-not-at-top  (fast --help and argument errors)
  import jax
  import seqio
  from vlpjax import sharding
  from vlpjax import trainer
  from vlpjax import workdir as workdir_lib
  from vlpjax.evaluators import captioning

  config = workdir_lib.read_config(workdir)
  trainer.import_data_modules(config)
  setup = trainer.build(config)
  if not hasattr(setup.family, "caption"):
    raise ValueError(f"family {config.family!r} does not caption images.")
  params, _ = workdir_lib.restore_params(workdir, setup, step)

  features = seqio.get_mixture_or_task(config.input.task).output_features
  vocab = (features.get("texts") or features["targets"]).vocabulary
  decode_cfg = decode_config(decode, vocab.eos_id)
  images = load_images(paths, config.input.image_size)
  # Pad to a multiple of the batch sharding; the padding rows' captions are dropped.
  split = sharding.batch_axis_size(setup.mesh, config.sharding_rules)
  padded = np.zeros((-(-len(images) // split) * split,) + images.shape[1:], np.float32)
  padded[:len(images)] = images
  with sharding.logical_context(setup.mesh, config.sharding_rules):
    tokens = jax.jit(lambda p, x: setup.family.caption(
        p, x, decode=decode_cfg, rng=jax.random.key(config.seed)))(
            params, sharding.global_batch({"x": padded}, setup.mesh, config.sharding_rules)["x"])
  return captioning.detokenize(vocab, np.asarray(tokens)[:len(images)], decode_cfg.eos_id)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vlpjax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a vlpjax.train workdir")
  parser.add_argument("--images", nargs="+", required=True, help="image files to caption")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
  parser.add_argument("--decode", default="", help="DecodeConfig fields, key=value,...")
  args = parser.parse_args(argv)
  try:
    captions = caption_images(args.workdir, args.images, args.step, args.decode)
  except (ValueError, config_lib.ConfigError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  for path, caption in zip(args.images, captions):
    print(f"{path}\t{caption}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
