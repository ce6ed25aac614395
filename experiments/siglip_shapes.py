"""SigLIP on the embedded shapes data: the CPU demo (`make demo`).

  python -m vlpjax.train --config experiments/siglip_shapes.py --workdir /tmp/siglip_shapes
  python -m vlpjax.train --config experiments/siglip_shapes.py:steps=200,loss=softmax ...
  python -m vlpjax.train --config experiments/siglip_shapes.py:flip=0.5 ...   # FLIP masking

A tiny ViT (patch 8 on 32 px images) and text transformer, trained from scratch with the
sigmoid loss; zero-shot classification over the 20 colour x shape classes, retrieval and
Winoground-style binary choice on the held-out split every `eval_every` steps and at the end.
"""
import ml_collections

from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax.data import shapes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1500, batch=128, size=32, loss="sigmoid",
                             rules="data_parallel", eval_every=500, flip=0.0)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch

  c.input = dict(
      task="shapes_captions", split="train",
      pp=f"random_resized_crop({arg.size}, scale=(0.8, 1.0))|value_range(-1, 1)",
      image_size=arg.size, text_length=16, shuffle_buffer=5_000)

  c.family = "two_tower"
  c.model_name = "two_tower"
  width = 128
  c.model = dict(
      image=dict(width=width, depth=4, mlp_dim=4 * width, num_heads=4, patch_size=8,
                 pool_type="map", posemb="learn",
                 # FLIP: ratio of image patches dropped in training (e.g. 0.5); evals see all.
                 patch_dropout=arg.flip),
      text=dict(width=width, depth=4, mlp_dim=4 * width, num_heads=4, max_len=16,
                vocab_size=512, pool_type="last"),
      embed_dim=width,
      temperature_init=2.3 if arg.loss == "sigmoid" else 2.66,   # log(10) / log(1/0.07)
      bias_init=-10.0 if arg.loss == "sigmoid" else None,
  )
  c.loss = arg.loss
  c.compute_dtype = "float32"  # CPUs have no fast bf16 matmul; pod configs use bfloat16.

  c.optim = dict(lr=1e-3, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = dict(type="cosine", warmup_steps=100)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules)

  eval_pp = f"resize({arg.size})|value_range(-1, 1)"
  c.evals = dict(
      zeroshot=dict(type="zeroshot_classification", every_steps=arg.eval_every,
                    task="shapes_captions", split="validation", pp=eval_pp, batch_size=256,
                    class_names=list(shapes.CLASS_NAMES),
                    templates=["a {}", "a photo of a {}", "{}"]),
      retrieval=dict(type="retrieval", every_steps=arg.eval_every, task="shapes_captions",
                     split="validation", pp=eval_pp, batch_size=256, ks=[1, 5]),
      # Winoground-style: held-out images paired by their most similar captions ("a small red
      # circle ..." vs "a small blue circle ..."); a tie counts as wrong.
      binary_choice=dict(type="binary_choice", every_steps=arg.eval_every,
                         task="shapes_captions", split="validation", pp=eval_pp,
                         batch_size=256),
  )
  c.log_every_steps = 50
  # 10 steps per compiled call (a lax.scan): on CPU each call costs a fresh buffer of
  # temporaries, paid once per 10 steps so (0.18 -> 0.15 s per step here). Logs,
  # evals and checkpoints fall on multiples of 10.
  c.steps_per_call = 10
  c.checkpoint = dict(every_steps=500, max_to_keep=2, async_save=True)
  return c
