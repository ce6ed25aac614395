"""big_vision's two-tower model in a plain jitted sigmoid-loss AdamW step: the yardstick.

`python -m tools.benchmark train --config <two_tower config> --reference big_vision` times
this beside the project's own step, in the same process, on the same batch. big_vision is
not a dependency and nothing of it is copied here: the model is imported from a checkout
given by `--big_vision_dir` or $BIG_VISION_DIR, e.g.

  git clone https://github.com/google-research/big_vision /tmp/big_vision
  pip install einops   # big_vision.utils imports it; not a vlpjax dependency

The step is what a user of big_vision would write first: `value_and_grad` of the sigmoid
loss over `two_towers.Model`'s embeddings, `optax.adamw` at a constant learning rate, params
and optimizer state donated. The model is built with the config's sizes: ViT variant, pool,
position embedding and text variant, vocabulary, embedding size, temperature and bias
initialisation, matmul dtype. (big_vision's encoders rematerialise only when scanned, and
here they are not: the comparable project setting is `remat_policy=none`.)
"""
import importlib
import math
import os
import sys
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

MODEL_MODULE = "big_vision.models.proj.image_text.two_towers"


def find_checkout(path: Optional[str]) -> str:
  path = path or os.environ.get("BIG_VISION_DIR")
  if not path:
    raise ValueError("--reference big_vision needs a big_vision checkout: "
                     "`git clone https://github.com/google-research/big_vision DIR`, then "
                     "--big_vision_dir DIR (or BIG_VISION_DIR=DIR).")
  model_file = os.path.join(path, *MODEL_MODULE.split(".")) + ".py"
  if not os.path.exists(model_file):
    raise ValueError(f"{path} is not a big_vision checkout: {model_file} does not exist.")
  return os.path.abspath(path)


class BigVisionTwoTower:
  """big_vision's `two_towers.Model` configured like a vlpjax two_tower `config`."""

  def __init__(self, config, checkout: Optional[str] = None):
    if config.family != "two_tower":
      raise ValueError(f"--reference big_vision compares two-tower models; the config's "
                       f"family is {config.family!r}.")
    if config.loss != "sigmoid":
      raise ValueError(f"--reference big_vision runs a sigmoid loss; the config has "
                       f"loss={config.loss!r}.")
    self.checkout = find_checkout(checkout)
    if self.checkout not in sys.path:
      sys.path.insert(0, self.checkout)
    self.config = config
    self.kwargs = self._model_kwargs(config)
    self.model = importlib.import_module(MODEL_MODULE).Model(**self.kwargs)

  @staticmethod
  def _model_kwargs(config) -> Dict[str, Any]:
    from vlpjax.models.vit import resolve_dims  # pylint: disable=g-import-not-at-top
    model = config.model.to_dict()
    image, text = dict(model.get("image") or {}), dict(model.get("text") or {})
    sizes = ("width", "depth", "mlp_dim", "num_heads")
    image_dims = resolve_dims(image.get("variant"), **{k: image.get(k)
                                                       for k in sizes + ("patch_size",)})
    text_dims = resolve_dims(text.get("variant"), need_patch=False,
                             **{k: text.get(k) for k in sizes})
    text_dims.pop("patch_size", None)  # a text variant such as "B" names no patch
    embed_dim = model.get("embed_dim") or image_dims["width"]
    patch = image_dims.pop("patch_size")
    # Sizes are passed explicitly (big_vision's variant table has the same names, but
    # explicit sizes also cover configs that set them one by one).
    bv_image = dict(image_dims, patch_size=(patch, patch),
                    pool_type=image.get("pool_type", "map"), posemb=image.get("posemb", "learn"),
                    dtype_mm=jnp.dtype(config.compute_dtype).name)
    bv_text = dict(text_dims, vocab_size=text.get("vocab_size", 32_000),
                   pool_type=text.get("pool_type", "last"))
    # big_vision's temperature_init is the temperature itself; vlpjax's is its log.
    return dict(image=bv_image, text=bv_text,
                out_dim=(None if image_dims["width"] == embed_dim else embed_dim, embed_dim),
                temperature_init=math.exp(model.get("temperature_init", math.log(10.0))),
                bias_init=model.get("bias_init", -10.0))

  def describe(self) -> Dict[str, Any]:
    return {"checkout": self.checkout, "model": MODEL_MODULE, "model_kwargs": self.kwargs,
            "optimizer": f"optax.adamw(lr={self.config.optim.lr}, "
                         f"weight_decay={self.config.optim.weight_decay})"}

  def _make_step(self, steps_per_call: int = 1):
    model = self.model
    tx = optax.adamw(self.config.optim.lr, b2=self.config.optim.get("b2", 0.999),
                     weight_decay=self.config.optim.weight_decay)

    def loss_fn(params, images, texts):
      zimg, ztxt, out = model.apply({"params": params}, images, texts)
      logits = zimg @ ztxt.T * out["t"] + out["b"]
      labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
      return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]

    def step(state, batch):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(params, batch["image"], batch["texts"])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    if steps_per_call > 1:
      # The same loop as vlpjax's `steps_per_call`: K steps in one program, on K copies of
      # the batch, so that both steps can be compared under one loop.
      def steps(state, batch):
        stacked = jax.tree.map(lambda x: jnp.stack([x] * steps_per_call), batch)
        return jax.lax.scan(step, state, stacked)
      return tx, jax.jit(steps, donate_argnums=(0,))
    return tx, jax.jit(step, donate_argnums=(0,))

  def prepare(self, batch: Dict[str, np.ndarray], steps_per_call: int = 1):
    """(jitted step, initial state, device batch) for `batch`, ready to time; with
    `steps_per_call` K > 1 one call runs K steps."""
    tx, step = self._make_step(steps_per_call)
    batch = {k: jnp.asarray(batch[k]) for k in ("image", "texts")}
    params = jax.jit(self.model.init)(jax.random.key(0), batch["image"][:1],
                                      batch["texts"][:1])["params"]
    return step, (params, tx.init(params)), batch

  def time(self, batch: Dict[str, np.ndarray], warmup: int, steps: int, sync: bool = False,
           clock=None, steps_per_call: int = 1) -> List[float]:
    """Seconds per step (after `warmup` untimed calls) on the default device, timed as
    `bench_train.time_steps` times the project's step (`clock`: a `bench_train.StepClock`
    that also records the host figures, per call)."""
    from tools import bench_train  # pylint: disable=g-import-not-at-top
    label = "step" if steps_per_call == 1 else "call"
    seconds, _ = bench_train.time_steps(*self.prepare(batch, steps_per_call), warmup, steps,
                                        sync, clock=clock, label=label)
    return [s / steps_per_call for s in seconds]
