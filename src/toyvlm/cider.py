"""CIDEr-D as COCO's ``pycocoevalcap`` computes it, with its PTB tokenisation, in plain Python.

``pycocoevalcap`` (the scorer behind the COCO / NoCaps / Flickr30k caption tables) tokenises every caption with the
Stanford PTBTokenizer (Java, ``-preserveLines -lowerCase``), drops the tokens in :data:`PTB_PUNCTUATION`, and scores
with ``CiderScorer`` (CIDEr-D):

* n-grams n = 1..4 of each tokenised caption;
* tf-idf vectors: term frequency times ``log(number of images) - log(max(1, document frequency))``, the document
  frequency of an n-gram being the number of images among whose *references* it occurs (the evaluated set's own
  references);
* per n, the clipped cosine ``sum(min(hyp, ref) * ref) / (|hyp| |ref|)`` times the length penalty
  ``exp(-delta^2 / (2 sigma^2))``, sigma = 6, where ``delta`` is the difference in *bigram* counts (the package
  counts the length at n = 2, i.e. tokens - 1 for a caption of at least two tokens; kept here);
* averaged over n, averaged over the references, times 10; the corpus score is the mean over images.

One PTB rule matters for generated text: a single letter followed by a period stays one token (``k.``, read as an
initial) unless a capitalised word follows, while ``k .`` (how a word-level tokenizer decodes) gives ``k``; the
toyvlm references therefore never end a sentence with the letter.

:func:`ptb_tokenize` re-implements the tokenizer for the text this project produces (lowercase words, digits,
hyphenated words and the punctuation ``. , : ; ? !``); any other character raises a ``ValueError`` rather than
tokenising differently from the Java original. The tests compare both halves with numbers produced by the package
(its Java tokenizer included) on fixtures.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

#: tokens ``pycocoevalcap.tokenizer.ptbtokenizer`` removes after PTB tokenisation
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
#: CiderScorer's defaults: n-grams up to N, length-penalty width SIGMA, final scale
CIDER_N = 4
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0
#: the n-gram order (1-based) whose count the package uses as a caption's length
LENGTH_ORDER = 2

#: a letter with its period, read as an initial by PTB: not part of a longer word, no capitalised word after it
_INITIAL = r"(?<![A-Za-z0-9])[A-Za-z]\.(?![A-Za-z0-9])(?!\s+[A-Z])"
_TOKEN = re.compile(_INITIAL + r"|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*|\.\.\.|--|[.,:;?!-]")
_SUPPORTED = re.compile(r"[A-Za-z0-9.,:;?!\-\s]*")


def ptb_tokenize(text: str) -> str:
    """``text`` as pycocoevalcap's PTBTokenizer leaves it: lowercased, punctuation split off and removed, tokens
    joined by single spaces. Only the character set above is supported."""
    if not _SUPPORTED.fullmatch(text):
        bad = sorted(set(re.sub(r"[A-Za-z0-9.,:;?!\-\s]", "", text)))
        raise ValueError(f"ptb_tokenize: characters {''.join(bad)!r} are outside the re-implemented PTB subset")
    tokens = (token.lower() for token in _TOKEN.findall(text))  # PTB lowercases after tokenising (-lowerCase)
    return " ".join(token for token in tokens if token not in PTB_PUNCTUATION)


def _ngrams(tokens: Sequence[str], n: int = CIDER_N) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]], tokenize: bool = True,
            n: int = CIDER_N, sigma: float = CIDER_SIGMA) -> tuple[float, dict[object, float]]:
    """(corpus CIDEr-D, {image key: CIDEr-D}) of one candidate caption per key against its references (at least one
    per key; document frequencies from these references). ``tokenize=False``: captions are already PTB-tokenised
    (space-separated tokens)."""
    if set(candidates) != set(references):
        raise ValueError("cider_d: candidates and references must have the same image keys")
    if not candidates:
        raise ValueError("cider_d: nothing to score")
    if any(not refs for refs in references.values()):
        raise ValueError("cider_d: every image needs at least one reference")
    prepare = ptb_tokenize if tokenize else (lambda text: text)
    keys = list(references)
    refs = {key: [_ngrams(prepare(ref).split(), n) for ref in references[key]] for key in keys}
    hyps = {key: _ngrams(prepare(candidates[key]).split(), n) for key in keys}
    frequency = Counter(gram for key in keys for gram in set().union(*refs[key]))
    log_images = math.log(len(keys))

    def vector(counts: Counter):
        """(tf-idf per n-gram order, norms, length in LENGTH_ORDER-grams)."""
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, frequency[gram])))
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        length = sum(tf for gram, tf in counts.items() if len(gram) == LENGTH_ORDER)
        return vec, norms, length

    scores = {}
    for key in keys:
        hyp, hyp_norm, hyp_length = vector(hyps[key])
        total = 0.0
        for ref_counts in refs[key]:
            ref, ref_norm, ref_length = vector(ref_counts)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma ** 2))
            for order in range(n):
                value = sum(min(weight, ref[order].get(gram, 0.0)) * ref[order].get(gram, 0.0)
                            for gram, weight in hyp[order].items())
                if hyp_norm[order] != 0 and ref_norm[order] != 0:
                    value /= hyp_norm[order] * ref_norm[order]
                total += value * penalty
        scores[key] = CIDER_SCALE * total / n / len(refs[key])
    return sum(scores.values()) / len(scores), scores
