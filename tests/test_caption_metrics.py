"""CIDEr-D / BLEU / ROUGE-L / tokenizer: hand-computed cases and agreement with pycocoevalcap.

METEOR / SPICE (`java_metrics`): agreement with pycocoevalcap's Java scorers and error paths.
"""
import math
import os
import shutil
import types

import numpy as np
import pytest

from vlpjax.evaluators import caption_metrics as cm
from vlpjax.evaluators import captioning
from vlpjax.evaluators import java_metrics as jm

# -- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("caption,want", [
    ("A man riding a wave on top of a surfboard.",
     "a man riding a wave on top of a surfboard"),
    ("The man's hot-dog isn't ready; he can't eat it!",
     "the man 's hot-dog is n't ready he ca n't eat it"),
    ("Two dogs' toys, a ball -- and a stick...", "two dogs toys a ball and a stick"),
    ("There are 1,000 people at 10:30 in the U.S.", "there are 1,000 people at 10:30 in the u.s."),
    ('A "red" (bright) sign: $5, 50% off', "a red -lrb- bright -rrb- sign $ 5 50 % off"),
    ("Mr. Smith cannot go. It rains.", "mr. smith can not go it rains"),
    ("  \t ", ""),
])
def test_tokenize_by_hand(caption, want):
  assert cm.tokenize(caption) == want.split()


# Plain COCO-style captions (the text `tokenize` promises to handle like PTB).
PTB_SENTENCES = [
    "A woman wearing a T-shirt holds an umbrella in the rain.",
    "Two giraffes standing next to each other in a field .",
    "A kitchen with stainless steel appliances, a sink, and a window",
    "There is a plate of food with broccoli, rice and chicken on it.",
    "A skateboarder does a trick on a half-pipe; people watch.",
    "The two-story building has a clock that reads 3:45.",
    "A child's birthday party with a cake and candles!",
    "Is this a cat or a dog?",
    "A man in a suit & tie talks on a cell phone.",
    "A room with a bed, a desk and a lamp..",
    "A bowl of fruit: apples, bananas, and oranges.",
    "THE TRAIN IS PULLING INTO THE STATION",
    "a dog that's catching a frisbee in mid-air",
    "A large jet (a Boeing 747) flying through a blue sky.",
    "Kids playing soccer in the park -- one is kicking the ball.",
    'A sign that says "No Parking" next to a street.',
    "They're sitting on a bench; we've got two zebras, I'm sure.",
    "A 10-year-old boy flying a kite in the U.K. at 5 p.m. today",
    "Dr. Who and Mrs. Jones vs. Mr. T, Jr. at St. Mary's",
    "I won't, you shouldn't, it's the 90's, gonna go",
    "A dog. It runs fast. Then it stops.",
    "a {curly} [square] bracket and a 12.5% rise for $3.50 each #1",
    "there is a cat:a black one, a big...dog and a man - on a bike",
    "the 1990s' style of a sign reading 'stop'",
]


def test_tokenize_matches_java_ptb_tokenizer():
  ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  if shutil.which("java") is None:
    pytest.skip("COCO's PTB tokenizer needs java")
  got = ptb.PTBTokenizer().tokenize(
      {i: [{"caption": s}] for i, s in enumerate(PTB_SENTENCES)})
  for i, sentence in enumerate(PTB_SENTENCES):
    assert cm.tokenize(sentence) == got[i][0].split(), sentence


# -- hand-computed cases ---------------------------------------------------------------------

def test_identical_captions_score_perfectly():
  refs = {0: ["a man riding a wave on a surfboard"], 1: ["two dogs play with a red ball"],
          2: ["a plate of food with broccoli"]}
  cands = {k: v[0] for k, v in refs.items()}
  cider, per_id = cm.cider_d(cands, refs)
  # Candidate and reference tf-idf vectors are identical: every cosine is 1, no length penalty.
  np.testing.assert_allclose(cider, 10.0, rtol=1e-12)
  np.testing.assert_allclose(list(per_id.values()), [10.0] * 3, rtol=1e-12)
  np.testing.assert_allclose(cm.bleu_scores(cands, refs)[0], [1.0] * 4, rtol=1e-9)
  assert cm.rouge_l(cands, refs) == 1.0


def test_disjoint_candidate_scores_zero():
  refs = {0: ["a man riding a wave"], 1: ["two dogs play"]}
  cands = {0: "the cat sleeps", 1: "blue sky"}
  assert cm.cider_d(cands, refs) == (0.0, {0: 0.0, 1: 0.0})
  assert cm.rouge_l(cands, refs) == 0.0
  assert cm.bleu(cands, refs) < 1e-12  # COCO's 1e-15 smoothing, never exactly 0


def test_cider_d_by_hand():
  # Two ids, so every reference n-gram (df = 1) has idf log 2; the second id shares nothing.
  refs = {"a": ["a b c"], "b": ["y"]}
  cands = {"a": "a b", "b": "x"}
  # Order 1: cand (a, b), ref (a, b, c), all weight L: cos = 2L^2 / (sqrt2 L sqrt3 L).
  # Order 2: cand (a b), ref (a b), (b c): cos = 1/sqrt2. Orders 3, 4: candidate has none -> 0.
  # Lengths 2 vs 3 words -> penalty exp(-1 / 72).
  want_a = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
  cider, per_id = cm.cider_d(cands, refs)
  np.testing.assert_allclose([per_id["a"], per_id["b"]], [want_a, 0.0], rtol=1e-12)
  np.testing.assert_allclose(cider, want_a / 2, rtol=1e-12)


def test_cider_d_clips_repeated_ngrams_and_uses_the_evaluated_sets_df():
  refs = {0: ["a dog"], 1: ["a cat"]}
  # "a" is in both ids' references: idf log(2/2) = 0, so only "dog" and "a dog" count.
  plain = cm.cider_d({0: "a dog", 1: "a cat"}, refs)[1][0]
  repeated = cm.cider_d({0: "dog dog", 1: "a cat"}, refs)[1][0]
  np.testing.assert_allclose(plain, 10 * (1 + 1) / 4, rtol=1e-12)
  # "dog dog": tf 2 clipped to the reference's 1 in the numerator but not in the norm:
  # order 1 = min(2L, L) * L / (2L * L) = 1/2; the bigram "dog dog" is in no reference.
  np.testing.assert_allclose(repeated, 10 * 0.5 / 4, rtol=1e-12)


def test_bleu_by_hand():
  cands = {0: "the cat sat on the mat"}
  refs = {0: ["the cat is on the mat"]}
  # Clipped matches: unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3; same length.
  scores, per_id = cm.bleu_scores(cands, refs)
  want4 = ((5 + 1e-15) / (6 + 1e-9) * (3 + 1e-15) / (5 + 1e-9) * (1 + 1e-15) / (4 + 1e-9)
           * 1e-15 / (3 + 1e-9)) ** 0.25
  np.testing.assert_allclose(scores, [5 / 6, math.sqrt(0.5), 0.5, want4], rtol=1e-8)
  np.testing.assert_allclose(per_id[0], scores, rtol=1e-12)
  assert cm.bleu(cands, refs, n=2) == scores[1]


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
  long_ref = "the cat sat on the warm mat"
  bleu1 = lambda cand, refs: cm.bleu_scores({0: cand}, {0: refs}, n=1)[0][0]
  # Closest reference has 3 words; the candidate has 2 (all matching): BP = exp(1 - 3/2).
  np.testing.assert_allclose(bleu1("the cat", [long_ref, "a cat sat"]), math.exp(-0.5),
                             rtol=1e-8)
  # 4 words between references of 3 and 5: the tie goes to the shorter, so no penalty.
  np.testing.assert_allclose(bleu1("the cat sat on", ["the cat sat", "the cat sat on it"]),
                             1.0, rtol=1e-8)
  # Corpus BLEU sums lengths and matches over ids (not a mean of per-id scores).
  cands = {0: "the cat", 1: "a dog runs fast"}
  refs = {0: ["the cat sat"], 1: ["a dog runs fast"]}
  np.testing.assert_allclose(cm.bleu_scores(cands, refs, n=1)[0][0], math.exp(1 - 7 / 6),
                             rtol=1e-8)


def test_rouge_l_by_hand():
  # LCS("a b c d", "a c e") = 2: P = 2/4, R = 2/3.
  p, r, b2 = 0.5, 2 / 3, 1.2 ** 2
  np.testing.assert_allclose(cm.rouge_l({0: "a b c d"}, {0: ["a c e"]}),
                             (1 + b2) * p * r / (r + b2 * p), rtol=1e-12)
  # COCO maximises P and R over references separately: P from the long reference (4/4), R
  # from the short one (2/2), so F = 1 though no reference equals the candidate.
  assert cm.rouge_l({0: "a b c d"}, {0: ["a b", "a b c d e f g h"]}) == 1.0
  assert cm._lcs_length("a x b y c".split(), "a b c x y".split()) == 3


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="same ids"):
    cm.cider_d({0: "a", 1: "b"}, {0: ["a"]})
  with pytest.raises(ValueError, match=r"references\[0\]"):
    cm.bleu({0: "a"}, {0: []})
  with pytest.raises(ValueError, match=r"references\[0\]"):
    cm.rouge_l({0: "a"}, {0: "a"})
  with pytest.raises(ValueError, match="must be a str"):
    cm.cider_d({0: ["a"]}, {0: ["a"]})
  with pytest.raises(ValueError, match="No candidates"):
    cm.cider_d({}, {})


# -- agreement with pycocoevalcap ------------------------------------------------------------

WORDS = ("a man dog cat on the red ball with two of in sitting table").split()


def _random_sets(num_sets=20):
  """Fixed candidate/reference sets with much overlap (small vocabulary, edited references)."""
  rng = np.random.default_rng(0)
  sets = []
  for s in range(num_sets):
    num_ids = 1 if s == 0 else int(rng.integers(2, 25))  # Set 0: one id (CIDEr's idf is 0).
    cands, refs = {}, {}
    for i in range(num_ids):
      sentence = lambda: " ".join(rng.choice(WORDS, size=int(rng.integers(1, 13))))
      refs[i] = [sentence() for _ in range(int(rng.integers(1, 6)))]
      if rng.random() < 0.5:  # A reference with some words swapped: high but imperfect scores.
        words = rng.choice(refs[i]).split()
        for j in rng.choice(len(words), size=len(words) // 3, replace=False):
          words[j] = rng.choice(WORDS)
        cands[i] = " ".join(words)
      else:
        cands[i] = sentence()
    sets.append((cands, refs))
  return sets


@pytest.mark.parametrize("index", range(20))
def test_agrees_with_pycocoevalcap(index):
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  cands, refs = _random_sets()[index]
  res = {k: [v] for k, v in cands.items()}
  ids = list(cands)
  tol = dict(rtol=1e-6, atol=1e-6)

  coco_cider, coco_cider_ids = Cider().compute_score(refs, res)
  cider, cider_ids = cm.cider_d(cands, refs)
  np.testing.assert_allclose(cider, coco_cider, **tol)
  np.testing.assert_allclose([cider_ids[k] for k in ids], coco_cider_ids, **tol)

  coco_bleu, coco_bleu_ids = Bleu(4).compute_score(refs, res, verbose=0)
  bleu, bleu_ids = cm.bleu_scores(cands, refs)
  np.testing.assert_allclose(bleu, coco_bleu, **tol)
  np.testing.assert_allclose([bleu_ids[k] for k in ids], np.transpose(coco_bleu_ids), **tol)
  np.testing.assert_allclose(cm.bleu(cands, refs), coco_bleu[3], **tol)

  coco_rouge, coco_rouge_ids = Rouge().compute_score(refs, res)
  np.testing.assert_allclose(cm.rouge_l(cands, refs), coco_rouge, **tol)
  rouge_ids = cm.rouge_l_scores(cands, refs)
  np.testing.assert_allclose([rouge_ids[k] for k in ids], coco_rouge_ids, **tol)


def test_empty_candidate_agrees_with_pycocoevalcap():
  # A captioner that emits EOS first produces "": it must score like COCO scores it, not fail.
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  cands = {0: "", 1: "a dog on the table", 2: "two cats"}
  refs = {0: ["a man on a red ball"], 1: ["a dog on a table", "the dog"], 2: ["two red cats"]}
  res = {k: [v] for k, v in cands.items()}
  tol = dict(rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(cm.cider_d(cands, refs)[0], Cider().compute_score(refs, res)[0],
                             **tol)
  np.testing.assert_allclose(cm.bleu_scores(cands, refs)[0],
                             Bleu(4).compute_score(refs, res, verbose=0)[0], **tol)
  np.testing.assert_allclose(cm.rouge_l(cands, refs), Rouge().compute_score(refs, res)[0],
                             **tol)


# -- METEOR and SPICE (pycocoevalcap's Java scorers) -----------------------------------------

needs_java = pytest.mark.skipif(not jm.java_available(), reason="METEOR needs java")


def _java_children():
  """PIDs of this process's java children, running or zombie (Linux /proc)."""
  me, pids = str(os.getpid()), []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
    except (OSError, ValueError):
      continue
    # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
    comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
    if comm == "java" and rest.split()[1] == me:
      pids.append(int(entry))
  return pids


def _meteor_sets():
  """Three random-word sets and one of punctuated COCO-style text with an empty candidate."""
  sets = _random_sets()[1:4]
  cands = {i: PTB_SENTENCES[i].replace(" a ", " the ", 1) for i in range(8)}
  cands[8] = ""
  refs = {i: [PTB_SENTENCES[i], PTB_SENTENCES[i + 12]] for i in range(9)}
  return sets + [(cands, refs)]


@needs_java
def test_meteor_agrees_with_pycocoevalcap():
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=g-import-not-at-top
  sets = _meteor_sets()
  before = set(_java_children())
  got = jm.meteor_corpora(sets)  # One Java process for the four sets.
  assert set(_java_children()) <= before  # It is gone (no zombie either).

  # COCO's pipeline: the Java PTB tokenizer, then pycocoevalcap's Meteor on each set.
  texts = {f"{s}/{k}/{j}": text for s, (cands, refs) in enumerate(sets) for k in cands
           for j, text in enumerate([cands[k]] + list(refs[k])) if text}
  tokenized = ptbtokenizer.PTBTokenizer().tokenize(
      {key: [{"caption": t}] for key, t in texts.items()})
  tok = lambda s, k, j: tokenized.get(f"{s}/{k}/{j}", [""])[0]  # "" was not sent
  scorer = Meteor()
  try:
    for s, (cands, refs) in enumerate(sets):
      res = {k: [tok(s, k, 0)] for k in cands}
      gts = {k: [tok(s, k, j + 1) for j in range(len(refs[k]))] for k in cands}
      want, want_ids = scorer.compute_score(gts, res)
      corpus, per_id = got[s]
      assert corpus == pytest.approx(want, abs=1e-12), s
      np.testing.assert_allclose([per_id[k] for k in cands], want_ids, rtol=0, atol=1e-12)
      assert 0 < corpus < 1
  finally:
    del scorer  # pycocoevalcap ends its java process in __del__.

  # The captioning evaluator's score() adds it on request, and only then.
  cands, refs = sets[-1]
  assert captioning.score(cands, refs, meteor=True)["meteor"] == got[-1][0]
  assert "meteor" not in captioning.score(cands, refs)


def test_meteor_bad_input_fails_before_java():
  with pytest.raises(ValueError, match="No candidates"):
    jm.meteor({}, {})
  with pytest.raises(ValueError, match=r"corpus|same ids"):
    jm.meteor_corpora([({0: "a dog"}, {0: ["a dog"]}), ({0: "a"}, {1: ["a"]})])
  assert jm.meteor_corpora([]) == []


def test_java_metrics_without_java_say_what_is_missing(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # An empty directory: no java on PATH.
  assert not jm.java_available() and not jm.spice_available()
  with pytest.raises(RuntimeError, match="METEOR cannot run here, it lacks Java"):
    jm.meteor({0: "a dog"}, {0: ["a dog"]})
  with pytest.raises(RuntimeError, match="SPICE cannot run here, it lacks Java"):
    jm.spice({0: "a dog"}, {0: ["a dog"]})
  # Config: "auto" turns METEOR off; True fails at construction, naming what is missing.
  assert jm.resolve_java_metrics("auto", "evals.cap.java_metrics") is False
  with pytest.raises(ValueError, match=r"evals.cap.java_metrics=True, but METEOR cannot run "
                                       r"here: Java \(no `java` on PATH"):
    captioning.Captioning("cap", dict(task="unused", java_metrics=True),
                          config=types.SimpleNamespace(family="coca"),
                          family=types.SimpleNamespace(caption=None), mesh=None)


def test_resolve_java_metrics():
  assert jm.resolve_java_metrics("auto", "x") == jm.java_available()
  assert jm.resolve_java_metrics(False, "x") is False
  assert jm.resolve_java_metrics("False", "x") is False  # A command-line override of "auto".
  if jm.java_available():
    assert jm.resolve_java_metrics(True, "x") is True
    assert jm.resolve_java_metrics("TRUE", "x") is True
  for bad in ("yes", 1, None):
    with pytest.raises(ValueError, match=r"evals.e.java_metrics must be one of \('auto', "
                                         r"True, False\)"):
      jm.resolve_java_metrics(bad, "evals.e.java_metrics")


def test_spice_without_corenlp_jars_says_so():
  if jm.spice_available():
    pytest.skip("the CoreNLP jars are installed here")
  with pytest.raises(RuntimeError, match="SPICE cannot run here.*Stanford CoreNLP 3.6.0 jars"):
    jm.spice({0: "a dog"}, {0: ["a dog"]})
  with pytest.raises(ValueError, match="No candidates"):  # Input is checked first.
    jm.spice({}, {})
