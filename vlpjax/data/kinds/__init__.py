"""One module per data kind: its seqio preprocessors, output features and sources.

Every generative kind yields prefix-LM examples in one format (see `docs/data.md`):
  inputs   int32 [n_in]   prompt tokens; one `<image>` id per image, at its place in the stream
  targets  int32 [n_tgt]  tokens to predict, ending in EOS
  images   uint8 [n_img, S, S, 3]  decoded and resized to the task's image size
so that `vlpjax.data.packing` can pack any mixture of kinds into rows that carry their images.
Kinds with more structure add features (video `frames`, document `input_boxes`).
"""
