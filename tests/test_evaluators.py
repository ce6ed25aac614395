"""Evaluator metrics on hand-computed cases."""
import numpy as np

from vlpjax.evaluators import retrieval
from vlpjax.data.vocab import default_vocabulary
from vlpjax.evaluators import zeroshot


def test_recall_at_k_hand_computed():
  sim = np.array([[0.9, 0.1, 0.0],    # right answer first
                  [0.8, 0.5, 0.1],    # right answer second
                  [0.3, 0.2, 0.1]])   # right answer third
  assert retrieval.recall_at_k(sim, [1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_recall_ties_count_as_wrong():
  assert retrieval.recall_at_k(np.zeros((4, 4)), [1, 3]) == {1: 0.0, 3: 0.0}


def test_identical_captions_are_interchangeable():
  tokens = np.array([[5, 6], [5, 6], [7, 8]])
  correct = retrieval.same_text(tokens)
  np.testing.assert_array_equal(correct, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  # Image 1 ranks caption 0 first: caption 0 has the same text as its own caption 1.
  sim = np.array([[0.9, 0.9, 0.0], [0.9, 0.2, 0.0], [0.0, 0.1, 0.5]])
  assert retrieval.recall_at_k(sim, [1], correct) == {1: 1.0}
  assert retrieval.recall_at_k(sim, [1]) == {1: 1 / 3}  # 0: tie, 1: wrong first, 2: right


def test_topk_accuracy_and_prompt_tokens():
  scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.2, 0.3, 0.4]])
  labels = np.array([1, 1, 0])
  assert zeroshot.topk_accuracy(scores, labels, 1) == 1 / 3
  assert zeroshot.topk_accuracy(scores, labels, 2) == 2 / 3

  vocab = default_vocabulary()
  rows = zeroshot.class_prompt_tokens(vocab, ["red circle", "star"], ["a {}", "{} on the left"], 4)
  assert rows.shape == (4, 4) and rows.dtype == np.int32
  expected = [vocab.encode(t.format(c))[:4] for t in ["a {}", "{} on the left"]
              for c in ["red circle", "star"]]  # template-major
  for row, ids in zip(rows, expected):
    np.testing.assert_array_equal(row[:len(ids)], ids)
    assert not row[len(ids):].any()
