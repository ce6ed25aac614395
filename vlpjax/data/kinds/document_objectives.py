"""UDOP's self-supervised objectives and document QA, as prefix-LM examples.

Each objective turns a validated document record (`document.validate` and
`document.decode_page`: `words` [N], `word_boxes` float64 [N, 4], `images`)
into the prefix-LM contract of `vlpjax.data.kinds`:

  inputs       int32 [n_in]       `<image>` (the page), the prompt, the OCR text
  targets      int32 [n_tgt]      ending in EOS
  images       uint8 [1, S, S, 3]
  input_boxes  float32 [n_in, 4]  the normalised box (x0, y0, x1, y1) of the word
                                  each input token belongs to; 0 for the image
                                  placeholder, the prompt, sentinels, loc tokens,
                                  and words whose layout the objective hides

Tokens are assembled by id: each word is encoded on its own (SentencePiece
starts it with "▁", as inside running text), and `<image>`, `<loc_k>` and
`<extra_id_k>` are the vocabulary's ids for them, so no stray "▁" pieces appear
and every word token knows its word. The vocabulary must be a
`vocab.MultimodalVocabulary`; its `num_loc_bins` sets the layout resolution.

Masking. The words are cut into groups of consecutive words (a new group
starts at each word with probability 1 / `mean_group_length`), and each group
is picked with probability `mask_ratio` (at least one group on a page with
words; at most `num_sentinels`). The k-th picked group, in reading order, gets
the sentinel `<extra_id_k>`; a group's box is the union of its words' boxes,
written as four loc tokens (`document.loc_bins`). Draws are stateless, from
seqio's per-example seed: the same task seed gives the same masks.

Worked examples: a 100 x 50 px page with the words "total" (10, 5, 40, 16),
"42" (46, 5, 58, 16), "date" (10, 25, 34, 36) and "12/03/24" (40, 25, 88, 36),
groups ["total" "42"] ["date"] ["12/03/24"], the first and last picked, 500
loc bins. Group 0's box (10, 5, 58, 16) is <loc_50><loc_50><loc_289><loc_160>,
group 2's (40, 25, 88, 36) is <loc_200><loc_250><loc_439><loc_359>. Strings
are `vocabulary.decode` of the ids (EOS, the last target id, decodes to "").

  Joint text-layout reconstruction: picked groups become their sentinel in the
  inputs; the targets give each sentinel, the group's words and its box.
    inputs   "<image> Joint Text-Layout Reconstruction.<extra_id_0> date<extra_id_1>"
    targets  "<extra_id_0> total 42<loc_50><loc_50><loc_289><loc_160>"
             "<extra_id_1> 12/03/24<loc_200><loc_250><loc_439><loc_359>"
    input_boxes  the box of "date" on its tokens, 0 elsewhere (a sentinel hides
             where its words were: predicting their loc tokens is the task).

  Layout modeling: every word stays in the inputs; each picked group is
  wrapped in its sentinel, which both opens and closes it (the vocabulary
  has no closing tokens, and a sentinel appears exactly twice, so the pair
  is unambiguous). The targets give each sentinel and its group's box.
    inputs   "<image> Layout Modeling.<extra_id_0> total 42<extra_id_0> date"
             "<extra_id_1> 12/03/24<extra_id_1>"
    targets  "<extra_id_0><loc_50><loc_50><loc_289><loc_160>"
             "<extra_id_1><loc_200><loc_250><loc_439><loc_359>"
    input_boxes  only on "date": wrapped words' layout is what is asked for.

  Visual text recognition: each picked group becomes its sentinel and its
  box's loc tokens; the targets give each sentinel and the group's words,
  which the model has to read off the page.
    inputs   "<image> Visual Text Recognition.<extra_id_0><loc_50><loc_50><loc_289>"
             "<loc_160> date<extra_id_1><loc_200><loc_250><loc_439><loc_359>"
    targets  "<extra_id_0> total 42<extra_id_1> 12/03/24"
    input_boxes  only on "date".

  Document QA (no masking): the question, then the words as context; every
  word token carries its box. Records without a question or an answer get a
  `problem` ("empty question" / "empty answer").
    question "what is the total?", answer "42":
    inputs   "<image> question: what is the total? context: total 42 date 12/03/24"
    targets  "42"

The prompts are `PROMPTS`; the objectives' names are `OBJECTIVES`.
"""
from typing import Dict, List, Optional, Tuple

import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data.kinds import document

Features = Dict[str, tf.Tensor]

JOINT = "joint_text_layout"
LAYOUT = "layout_modeling"
RECOGNITION = "visual_text_recognition"
QA = "qa"
OBJECTIVES = (JOINT, LAYOUT, RECOGNITION, QA)
UDOP_OBJECTIVES = (JOINT, LAYOUT, RECOGNITION)
PROMPTS = {
    JOINT: "Joint Text-Layout Reconstruction.",
    LAYOUT: "Layout Modeling.",
    RECOGNITION: "Visual Text Recognition.",
    QA: "question: {question} context:",
}
# UDOP's ratios: little text to restore, most layout to predict, half to read.
DEFAULT_MASK_RATIOS = {JOINT: 0.15, LAYOUT: 0.75, RECOGNITION: 0.5}
DEFAULT_MEAN_GROUP_LENGTH = 3.0
# Features a document example keeps beside the ones the objectives make.
_KEPT = ("id", bad_records.PROBLEM_KEY, "images", "question", "answer")

# --------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------


def draw_groups(num_words: tf.Tensor, seed: tf.Tensor,
                mean_group_length: float = DEFAULT_MEAN_GROUP_LENGTH,
                mask_ratio: float = 0.15, max_masked: int = 100
                ) -> Tuple[tf.Tensor, tf.Tensor]:
  """(group_ids int32 [N], masked bool [G]): the masking of the module docstring.

  group_ids are 0, 0, 1, ... (nondecreasing, every group non-empty); at least
  one group is masked when N > 0, at most `max_masked`. A pure function of
  (num_words, seed).
  """
  if mean_group_length < 1:
    raise ValueError(f"mean_group_length must be >= 1, got {mean_group_length}")
  if not 0 < mask_ratio <= 1:
    raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
  split = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  num_words = tf.cast(num_words, tf.int32)
  starts = tf.random.stateless_uniform([num_words], split[0]) < 1.0 / mean_group_length
  starts |= tf.equal(tf.range(num_words), 0)
  group_ids = tf.cumsum(tf.cast(starts, tf.int32)) - 1
  num_groups = tf.reduce_sum(tf.cast(starts, tf.int32))
  draw = tf.random.stateless_uniform([num_groups], split[1])
  masked = draw < mask_ratio
  # Nothing drawn: mask the group with the lowest draw (the sentinel 2.0 keeps
  # argmin defined on a page without words).
  lowest = tf.argmin(tf.concat([draw, [2.0]], 0), output_type=tf.int32)
  masked = tf.where(tf.reduce_any(masked), masked, tf.equal(tf.range(num_groups), lowest))
  masked &= tf.cumsum(tf.cast(masked, tf.int32)) <= max_masked
  return group_ids, masked


class _Groups:
  """Per-word views of a grouping: masked, first/last of group, sentinel, box bins."""

  def __init__(self, group_ids: tf.Tensor, masked: tf.Tensor, word_boxes: tf.Tensor,
               vocabulary):
    ids = vocabulary.special_ids
    group_ids = tf.cast(group_ids, tf.int32)
    masked = tf.cast(masked, tf.bool)
    num_groups = tf.shape(masked)[0]
    self.masked = tf.gather(masked, group_ids)
    self.first = tf.not_equal(group_ids, tf.concat([[-1], group_ids[:-1]], 0))
    self.last = tf.not_equal(group_ids, tf.concat([group_ids[1:], [-1]], 0))
    # The k-th masked group, in reading order, gets <extra_id_k> (T5 ids count down).
    k = tf.gather(tf.cumsum(tf.cast(masked, tf.int32)) - 1, group_ids)
    self.sentinel = ids.vocab_size - 1 - k
    fractions = tf.cast(word_boxes, tf.float64)
    union = tf.concat([
        tf.math.unsorted_segment_min(fractions[:, :2], group_ids, num_groups),
        tf.math.unsorted_segment_max(fractions[:, 2:], group_ids, num_groups)], axis=1)
    bins = document.quantise(union, vocabulary.spec.num_loc_bins)
    self.loc_ids = tf.gather(bins, group_ids) + ids.loc_start  # int32 [N, 4]


# --------------------------------------------------------------------------------
# Token streams
# --------------------------------------------------------------------------------


def _rows(ids: tf.Tensor, keep: tf.Tensor) -> tf.RaggedTensor:
  """Row i holds ids[i] ([N] or [N, k]) where keep[i], nothing elsewhere."""
  ids = tf.cast(ids, tf.int32)
  if ids.shape.rank == 1:
    ids = ids[:, None]
  lengths = tf.where(keep, tf.shape(ids)[1], 0)
  return tf.RaggedTensor.from_tensor(ids, lengths=lengths)


def _only(ragged: tf.RaggedTensor, keep: tf.Tensor) -> tf.RaggedTensor:
  """The rows of `ragged` where keep, emptied elsewhere."""
  per_value = tf.repeat(keep, ragged.row_lengths())
  return tf.RaggedTensor.from_row_lengths(tf.boolean_mask(ragged.values, per_value),
                                          tf.where(keep, ragged.row_lengths(), 0))


class _Stream:
  """Token pieces per word, concatenated word by word: (ids [T], boxes [T, 4]).

  Each piece is a ragged [N, None] of ids with, optionally, boxes [N, 4] that
  its tokens inherit from their word (else 0).
  """

  def __init__(self):
    self._pieces: List[Tuple[tf.RaggedTensor, Optional[tf.Tensor]]] = []

  def add(self, ids: tf.RaggedTensor, boxes: Optional[tf.Tensor] = None) -> "_Stream":
    self._pieces.append((ids, boxes))
    return self

  def flatten(self) -> Tuple[tf.Tensor, tf.Tensor]:
    ids, boxes = [], []
    for piece, word_boxes in self._pieces:
      ids.append(piece)
      if word_boxes is None:
        values = tf.zeros([tf.size(piece.values), 4], tf.float32)
      else:
        values = tf.gather(tf.cast(word_boxes, tf.float32), piece.value_rowids())
      boxes.append(tf.RaggedTensor.from_row_lengths(values, piece.row_lengths()))
    return (tf.concat(ids, axis=1).flat_values,
            tf.ensure_shape(tf.concat(boxes, axis=1).flat_values, [None, 4]))


def _word_tokens(words: tf.Tensor, vocabulary) -> tf.RaggedTensor:
  tokens = vocabulary.encode_tf(words)
  return tf.cast(tokens, tf.int32)


def _example(prompt_ids: tf.Tensor, stream: _Stream, target_ids: tf.Tensor,
             vocabulary) -> Features:
  """<image> + prompt + stream as inputs (boxes 0 before the stream), targets + EOS."""
  body, body_boxes = stream.flatten()
  head = tf.concat([[vocabulary.special_ids.image_id(0)],
                    tf.cast(prompt_ids, tf.int32)], 0)
  return {
      "inputs": tf.concat([head, body], 0),
      "input_boxes": tf.concat([tf.zeros([tf.size(head), 4], tf.float32), body_boxes], 0),
      "targets": tf.concat([tf.cast(target_ids, tf.int32), [vocabulary.eos_id]], 0),
  }


def _prompt(objective: str, vocabulary) -> tf.Tensor:
  return vocabulary.encode_tf(tf.constant(PROMPTS[objective]))


# --------------------------------------------------------------------------------
# The objectives on one record (explicit groups, so tests can choose them)
# --------------------------------------------------------------------------------


def joint_text_layout_example(words, word_boxes, group_ids, masked, vocabulary) -> Features:
  """Joint text-layout reconstruction (module docstring) for a given masking."""
  g = _Groups(group_ids, masked, word_boxes, vocabulary)
  tokens = _word_tokens(words, vocabulary)
  opens = g.first & g.masked
  stream = (_Stream().add(_rows(g.sentinel, opens))
            .add(_only(tokens, ~g.masked), word_boxes))
  targets, _ = (_Stream().add(_rows(g.sentinel, opens)).add(_only(tokens, g.masked))
                .add(_rows(g.loc_ids, g.last & g.masked)).flatten())
  return _example(_prompt(JOINT, vocabulary), stream, targets, vocabulary)


def layout_modeling_example(words, word_boxes, group_ids, masked, vocabulary) -> Features:
  """Layout modeling (module docstring) for a given masking."""
  g = _Groups(group_ids, masked, word_boxes, vocabulary)
  tokens = _word_tokens(words, vocabulary)
  opens = g.first & g.masked
  stream = (_Stream().add(_rows(g.sentinel, opens))
            .add(_only(tokens, ~g.masked), word_boxes)
            .add(_only(tokens, g.masked))  # A word is in one of these two pieces.
            .add(_rows(g.sentinel, g.last & g.masked)))
  with_locs = tf.concat([g.sentinel[:, None], g.loc_ids], axis=1)
  targets, _ = _Stream().add(_rows(with_locs, opens)).flatten()
  return _example(_prompt(LAYOUT, vocabulary), stream, targets, vocabulary)


def visual_text_recognition_example(words, word_boxes, group_ids, masked,
                                    vocabulary) -> Features:
  """Visual text recognition (module docstring) for a given masking."""
  g = _Groups(group_ids, masked, word_boxes, vocabulary)
  tokens = _word_tokens(words, vocabulary)
  opens = g.first & g.masked
  with_locs = tf.concat([g.sentinel[:, None], g.loc_ids], axis=1)
  stream = (_Stream().add(_rows(with_locs, opens))
            .add(_only(tokens, ~g.masked), word_boxes))
  targets, _ = (_Stream().add(_rows(g.sentinel, opens)).add(_only(tokens, g.masked))
                .flatten())
  return _example(_prompt(RECOGNITION, vocabulary), stream, targets, vocabulary)


def qa_example(words, word_boxes, question, answer, vocabulary) -> Features:
  """Document QA (module docstring): question and words in, answer out."""
  # A join, not a regex replace: questions may hold backslashes or "$".
  before, after = PROMPTS[QA].split("{question}")
  prompt = tf.strings.join([before, question, after])
  stream = _Stream().add(_word_tokens(words, vocabulary), word_boxes)
  return _example(vocabulary.encode_tf(prompt), stream, vocabulary.encode_tf(answer),
                  vocabulary)


_BUILDERS = {JOINT: joint_text_layout_example, LAYOUT: layout_modeling_example,
             RECOGNITION: visual_text_recognition_example}

# --------------------------------------------------------------------------------
# seqio preprocessors
# --------------------------------------------------------------------------------


def _vocabulary(output_features):
  vocabulary = output_features["inputs"].vocabulary
  if not hasattr(vocabulary, "special_ids"):
    raise ValueError("document objectives need a vocabulary with structure tokens "
                     f"(vocab.multimodal_vocabulary()), got {type(vocabulary).__name__}")
  return vocabulary


def _output(features: Features, made: Features) -> Features:
  return {**{k: features[k] for k in _KEPT if k in features}, **made}


def udop_objective(ds: tf.data.Dataset, output_features, objective: str = JOINT,
                   mask_ratio: Optional[float] = None,
                   mean_group_length: float = DEFAULT_MEAN_GROUP_LENGTH) -> tf.data.Dataset:
  """One of `OBJECTIVES` over validated records (use with functools.partial).

  Masking draws from seqio's per-example seed (`num_seeds=1`), so the task
  seed fixes every mask. `mask_ratio` defaults to `DEFAULT_MASK_RATIOS`.
  """
  if objective == QA:
    return document_qa(ds, output_features)
  if objective not in _BUILDERS:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  vocabulary = _vocabulary(output_features)
  ratio = DEFAULT_MASK_RATIOS[objective] if mask_ratio is None else mask_ratio
  draw_groups(0, tf.constant([0, 0]), mean_group_length, ratio)  # Checks the options now.
  build = _BUILDERS[objective]

  @seqio.map_over_dataset(num_seeds=1)
  def fn(features, seed):
    words = features["words"]
    group_ids, masked = draw_groups(tf.size(words), seed, mean_group_length, ratio,
                                    vocabulary.spec.num_sentinels)
    made = build(words, features["word_boxes"], group_ids, masked, vocabulary)
    return _output(features, made)

  return fn(ds)


def document_qa(ds: tf.data.Dataset, output_features) -> tf.data.Dataset:
  """Document QA over validated records; an empty question or answer is a problem."""
  vocabulary = _vocabulary(output_features)

  def fn(features):
    question, answer = features["question"], features["answer"]
    made = qa_example(features["words"], features["word_boxes"], question, answer,
                      vocabulary)
    problem = bad_records.first_problem([
        (tf.strings.length(tf.strings.strip(question)) > 0,
         "empty question: document QA needs a 'question'"),
        (tf.strings.length(tf.strings.strip(answer)) > 0,
         "empty answer: document QA needs an 'answer'")])
    return bad_records.add_problem(_output(features, made), problem)

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
