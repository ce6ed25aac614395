"""Prefix-LM VLM on the embedded shapes data: the CPU captioning demo.

  python -m vlpjax.train --config experiments/vlm_shapes.py --workdir /tmp/vlm_shapes
  python -m vlpjax.train --config experiments/vlm_shapes.py:steps=400,stage=full ...

A tiny ViT (patch 8 on 32 px images: 16 tokens per image) feeds, through an MLP projector, a
tiny Llama-style decoder; both are trained from scratch on `shapes_captions_prefix_lm`
(inputs [<image>], targets the caption), packed several examples to a row. The `captioning`
eval greedily captions held-out images and scores CIDEr-D against their captions, next to a
constant caption that names the most frequent words (the baseline a captioner must beat).

`stage` sets `optim.freeze` as the VLM recipes do (`vlpjax.families.vlm.FREEZE_BY_STAGE`):
full (default here: nothing is pretrained), projector (img and llm frozen), lora (needs
lora_rank > 0; img and the LM's base weights frozen).
"""
import ml_collections

from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax.families import vlm as vlm_family


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1000, batch=32, size=32, stage="full", lora_rank=0,
                             rules="data_parallel", eval_every=500)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch   # packed rows of `row_length` tokens, ~3 examples each

  c.input = dict(
      task="shapes_captions_prefix_lm", split="train",
      pp=f'resize({arg.size}, key="images")|value_range(-1, 1, key="images")',
      image_size=arg.size, shuffle_buffer=5_000,
      # 1 BOS + 16 image tokens + a caption of at most 10 tokens with EOS: 3 fit in 80.
      row_length=80, max_images_per_row=3, tokens_per_image=0)

  c.family = "vlm"
  c.model_name = "vlm"
  width = 128
  c.model = dict(
      image=dict(width=width, depth=2, mlp_dim=4 * width, num_heads=4, patch_size=8,
                 posemb="learn"),
      llm=dict(vocab_size=1280,  # the shapes multimodal vocabulary's 1213 ids, padded
               width=width, depth=2, mlp_dim=4 * width, num_heads=4, num_kv_heads=2,
               lora_rank=arg.lora_rank),
      projector="mlp",
  )
  c.compute_dtype = "float32"  # CPUs have no fast bf16 matmul; pod configs use bfloat16.

  c.optim = dict(lr=2e-3, weight_decay=1e-4, grad_clip_norm=1.0,
                 freeze=vlm_family.freeze_regex(arg.stage, arg.lora_rank))
  c.schedule = dict(type="cosine", warmup_steps=100)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules)

  c.evals = dict(
      captioning=dict(
          type="captioning", every_steps=arg.eval_every, task="shapes_captions",
          split="validation", pp=f"resize({arg.size})|value_range(-1, 1)", batch_size=250,
          decode=dict(method="greedy", max_decode_len=12), max_examples=500,
          # The best constant caption of a grid search: CIDEr-D 0.90 on these 500.
          baseline_caption="a small yellow square at the top"),
  )
  c.log_every_steps = 50
  c.steps_per_call = 10  # steps per compiled call, as in siglip_shapes.py
  c.checkpoint = dict(every_steps=500, max_to_keep=2, async_save=True)
  return c
