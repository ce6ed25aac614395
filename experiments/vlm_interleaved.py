"""Prefix-LM VLM on interleaved image-text stories plus their text alone (VILA-style mix).

  python -m vlpjax.train --config experiments/vlm_interleaved.py --workdir /tmp/vlm_stories

Trains the demo-sized VLM of `vlm_shapes.py` from scratch on `stories_mixed` (3 parts
`stories_interleaved`: text and images in reading order, the text after the last image as
targets; 1 part `stories_text`: the same stories' text only, no image slots), packed into
rows with up to `max_images_per_row` images. Two held-out evals score the same targets of
`stories_interleaved` twice, with the images and with every image removed (`drop_images`):
a model that reads its images predicts "then it turns blue." from the blue shape it sees, so
`loss_with_images` must end below `loss_without_images`.
"""
import ml_collections

from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax.families import vlm as vlm_family


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=800, batch=16, size=32, stage="full", lora_rank=0,
                             rules="data_parallel", eval_every=400)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch

  images_pp = f'resize({arg.size}, key="images")|value_range(-1, 1, key="images")'
  c.input = dict(
      task="stories_mixed", split="train", pp=images_pp, image_size=arg.size,
      shuffle_buffer=2_000,
      # A 5-step story is 5 images x 16 tokens + ~45 text tokens; text-only ones fill gaps.
      row_length=192, max_images_per_row=8, tokens_per_image=0)

  c.family = "vlm"
  c.model_name = "vlm"
  width = 128
  c.model = dict(
      image=dict(width=width, depth=2, mlp_dim=4 * width, num_heads=4, patch_size=8,
                 posemb="learn"),
      llm=dict(vocab_size=1280, width=width, depth=2, mlp_dim=4 * width, num_heads=4,
               num_kv_heads=2, lora_rank=arg.lora_rank),
      projector="mlp",
  )
  c.compute_dtype = "float32"

  c.optim = dict(lr=2e-3, weight_decay=1e-4, grad_clip_norm=1.0,
                 freeze=vlm_family.freeze_regex(arg.stage, arg.lora_rank))
  c.schedule = dict(type="cosine", warmup_steps=100)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules)

  held_out = dict(type="prefix_lm_loss", every_steps=arg.eval_every,
                  task="stories_interleaved", split="validation", pp=images_pp,
                  batch_size=16)
  c.evals = dict(loss_with_images=dict(held_out, drop_images=False),
                 loss_without_images=dict(held_out, drop_images=True))
  c.log_every_steps = 50
  c.steps_per_call = 10  # steps per compiled call, as in siglip_shapes.py
  c.checkpoint = dict(every_steps=400, max_to_keep=2, async_save=True)
  return c
