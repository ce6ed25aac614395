"""QA metrics: exact match, ANLS, VQA accuracy and the most-frequent-answer baseline.

Expected values are worked out by hand in the comments.
"""
import functools
import itertools
import random

import pytest

from vlpjax.evaluators import qa_metrics as qa

# -- exact match and ANLS --------------------------------------------------------------------


@pytest.mark.parametrize("answer,want", [
    ("  The U.S.,  Total! ", "the us total"),
    ("12/03/24", "120324"),                  # deleted, not replaced by a space
    ("Café — “quoted”", "café quoted"),      # Unicode dash and quotes are punctuation
    ("$42 + 5%", "42 5"),
    ("", ""),
])
def test_normalize_answer(answer, want):
  assert qa.normalize_answer(answer) == want
  assert qa.normalize_answer(want) == want  # Idempotent.


def test_exact_match():
  assert qa.exact_match("Total: 42", ["total 42"]) == 1.0
  assert qa.exact_match("42", ["forty-two", "42."]) == 1.0
  assert qa.exact_match("42", "42") == 1.0
  assert qa.exact_match("43", ["42"]) == 0.0
  assert qa.exact_match("the total", ["total"]) == 0.0  # Articles are kept.
  with pytest.raises(ValueError, match="at least one accepted answer"):
    qa.exact_match("42", [])


@pytest.mark.parametrize("a,b,want", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("intention", "execution", 5),
    ("", "abc", 3), ("abc", "", 3), ("same", "same", 0),
])
def test_levenshtein_by_hand(a, b, want):
  assert qa.levenshtein(a, b) == want == qa.levenshtein(b, a)


def test_levenshtein_against_recursion():
  # The textbook recursive definition, memoised, on random short strings.
  @functools.lru_cache(maxsize=None)
  def distance(a, b):
    if not a or not b:
      return len(a) + len(b)
    return min(distance(a[1:], b) + 1, distance(a, b[1:]) + 1,
               distance(a[1:], b[1:]) + (a[0] != b[0]))

  rng = random.Random(0)
  for _ in range(200):
    a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
    b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
    assert qa.levenshtein(a, b) == distance(a, b), (a, b)


@pytest.mark.parametrize("pred,answers,want", [
    ("Kitten", ["sitting"], 4 / 7),          # case-insensitive; NL = 3/7 < 0.5
    ("abc", ["xyz", "abd"], 2 / 3),          # max over answers: NL 1 and 1/3
    ("flaw", ["lawn"], 0.0),                 # NL = 2/4 = 0.5 is not < 0.5
    ("42.", ["42"], 2 / 3),                  # punctuation counts: 1 edit / 3
    ("  Total   42 ", ["total 42"], 1.0),     # whitespace collapsed
    ("", [""], 1.0),                         # both empty: NL = 0
    ("", ["a"], 0.0),
])
def test_anls_by_hand(pred, answers, want):
  assert qa.anls(pred, answers) == pytest.approx(want, abs=1e-12)


def test_anls_threshold():
  # NL = 3/7: cut at threshold 0.4, kept at 0.5.
  assert qa.anls("kitten", "sitting", threshold=0.4) == 0.0


# -- VQA accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize("answer,want", [
    ("Two", "2"), ("TEN dogs", "10 dogs"), ("none", "0"),          # number words
    ("a dog.", "dog"), ("The Cat", "cat"), ("an apple", "apple"),  # articles, final period
    ("dont", "don't"), ("Couldntve", "couldn't've"), ("couldn'tve", "couldn't've"),
    ("yall", "y'all"), ("twas", "'twas"),
    ("well", "well"), ("its", "its"), ("were", "were"),            # words, not contractions
    ("3.5", "3.5"), ("u.s.", "us"), ("2:50 pm", "2:50 pm"),        # decimals and colons stay
    ("girl's", "girl's"), ("$5", "$5"),                            # as does the apostrophe
    ("100,978", "100978"),                      # a comma between digits is deleted ...
    ("1,000 red/blue", "1000 redblue"),         # ... and then every other mark too
    ("black/white", "black white"),             # a mark inside a word: a space
    ("yes, it is", "yes it is"),                # a mark next to a space: deleted
    ("t-shirt - red", "tshirt red"),            # ... everywhere in the answer
    ("left\tside\n", "left side"), ("(yes)!", "yes"), ("", ""),
])
def test_normalize_vqa_answer(answer, want):
  assert qa.normalize_vqa_answer(answer) == want


def _ten(k, right="2", wrong="3"):
  return [right] * k + [wrong] * (10 - k)


@pytest.mark.parametrize("k,want", [
    # Leaving out one of the k matching answers leaves k - 1, any other leaves k:
    # (k min(1, (k-1)/3) + (10-k) min(1, k/3)) / 10.
    (0, 0.0),
    (1, 0.3),            # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),            # (2 * 1/3 + 8 * 2/3) / 10 = 6 / 10
    (3, 0.9),            # (3 * 2/3 + 7 * 1) / 10: 3 of 10 is not quite full credit
    (4, 1.0),            # (4 * 1 + 6 * 1) / 10
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out_by_hand(k, want):
  assert qa.vqa_accuracy("2", _ten(k)) == pytest.approx(want, abs=1e-12)
  assert qa.vqa_accuracy("Two.", _ten(k, right="two")) == pytest.approx(want, abs=1e-12)


def test_vqa_accuracy_fewer_answers():
  # 5 answers, 2 match: leaving a match out leaves 1 (1/3, twice), any other 2 (2/3, 3 times):
  # (2/3 + 2) / 5 = 8/15.
  assert qa.vqa_accuracy("dog", ["a dog", "Dog", "cat", "cat", "bird"]) == pytest.approx(8 / 15)
  # A single answer leaves no one to agree with: the normalised exact match.
  assert qa.vqa_accuracy("The dog.", "dog") == 1.0
  assert qa.vqa_accuracy("dogs", ["dog"]) == 0.0
  with pytest.raises(ValueError, match="at least one accepted answer"):
    qa.vqa_accuracy("dog", [])
  with pytest.raises(ValueError, match="a prediction must be a str"):
    qa.vqa_accuracy(3, ["3"])


def test_vqa_accuracy_against_explicit_subsets():
  # Second path: enumerate the leave-one-out subsets themselves on random answer lists.
  rng = random.Random(0)
  words = ["two", "2", "a dog", "dog", "dont", "don't", "red", "Red."]
  for _ in range(100):
    answers = [rng.choice(words) for _ in range(rng.randint(2, 10))]
    pred = rng.choice(words)
    norm = qa.normalize_vqa_answer
    subsets = itertools.combinations(answers, len(answers) - 1)
    scores = [min(1.0, sum(norm(a) == norm(pred) for a in s) / 3) for s in subsets]
    assert qa.vqa_accuracy(pred, answers) == pytest.approx(sum(scores) / len(scores))


# -- over questions --------------------------------------------------------------------------


def test_qa_scores():
  # EM: 1, 0. ANLS: 1, and "totl" vs "total" 1 - 1/5 = 0.8. VQA accuracy (one answer each):
  # 1, 0.
  scores = qa.qa_scores(["42", "totl"], [["42"], "total"])
  assert scores == pytest.approx({"exact_match": 0.5, "anls": 0.9, "vqa_accuracy": 0.5})
  # VQA accuracy maps number words and drops articles, exact match does neither (EM 0):
  # 4 of 10 agree: 1; 3 of 3 agree: each leave-one-out subset has 2 matches, 2/3.
  scores = qa.qa_scores(["two dogs", "a cat"], [_ten(4, "2 dogs"), ["cat", "cat", "the cat"]])
  assert scores == pytest.approx({"exact_match": 0.0, "anls": scores["anls"],
                                  "vqa_accuracy": (1 + 2 / 3) / 2})
  with pytest.raises(ValueError, match="one prediction per question"):
    qa.qa_scores(["a"], [])


def test_most_frequent_answer_baseline():
  # "yes" (twice after normalising) beats "42" and "no"; it matches 2 of 3 questions.
  answer, em_score = qa.most_frequent_answer_baseline(
      ["42", "Yes", "yes.", "no"], [["yes"], "no", ["YES!", "y"]])
  assert answer == "yes" and em_score == pytest.approx(2 / 3)
  assert qa.most_frequent_answer_baseline(["b", "a"], ["a"]) == ("a", 1.0)  # Tie: first a-z.
