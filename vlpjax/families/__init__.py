"""Model families: the small interface through which the one trainer serves every model.

A family turns a config into a Flax module and tells the trainer how to

- `input_specs(batch_size)`: the shapes of a batch (for init and ahead-of-time compilation),
- `init(rng, batch)`: boxed params (with logical axis names),
- `features(params, batch, rng)`: per-example outputs that do not mix examples,
- `features_loss(params, features)`: the loss over a whole batch of features,
- and per-family predict functions used by evaluators (e.g. `embed_images`).

Splitting the loss into `features` and `features_loss` is what makes gradient accumulation exact
for losses that couple the batch (contrastive): see `vlpjax/train_step.py`.
"""
from vlpjax.registry import Registry

FAMILIES = Registry("model family")


def get_family(config):
  """The family named by `config.family`, built for this config."""
  # Importing registers the built-in families; kept local so the registry has no model deps.
  from vlpjax.families import two_tower  # pylint: disable=g-import-not-at-top,unused-import
  return FAMILIES.get(config.family)(config)
