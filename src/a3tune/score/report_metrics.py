"""Report-generation metrics with the numbers of the standard COCO caption evaluation (pycocoevalcap).

The reference's report scorer is not in its repository (a3tune-method.md §9.4), so report metrics follow the
de-facto standard for radiology report generation, the MS-COCO caption evaluation, through ``pycocoevalcap`` (PyPI,
the maintained Python 3 port of coco-caption):

- BLEU-1..4: corpus level, brevity penalty against the closest reference length (pycocoevalcap ``Bleu``);
- ROUGE-L: LCS-based F-measure with beta 1.2, best reference per sample, averaged over samples (``Rouge``);
- CIDEr-D: tf-idf weighted 1-4-grams, document frequencies from the references of the evaluated set, Gaussian
  length penalty sigma 6, clipped counts, ×10 (``Cider``). A one-sample set scores 0 (every idf is log 1 = 0);
- METEOR: METEOR 1.5 (``meteor-1.5.jar`` with its English paraphrase table, both shipped in the pycocoevalcap
  wheel, ``-l en -norm``), which needs a Java runtime on PATH. Without one the ``meteor`` key is left out (with a
  warning) rather than replaced by a different METEOR (nltk's needs WordNet data that no registry package ships
  for offline use, and its parameters differ from METEOR 1.5, so its numbers would not be the COCO ones).

Tokenisation, as in COCO, comes first: the Stanford PTB tokenizer (CoreNLP 3.4.1, ``-preserveLines -lowerCase``)
then the COCO punctuation tokens are dropped. ``tokenizer="ptb-java"`` runs that jar (shipped in the pycocoevalcap
wheel; needs Java), ``"ptb-python"`` its pure-Python re-implementation (:mod:`a3tune.score.ptb_tokenizer`, token for
token the same on report text, tested on over 20,000 sentences), and the default ``"auto"`` the jar whenever Java is on
PATH. As in pycocoevalcap, predictions and references are tokenized as two batches (a rule's trailing context can
reach into the next line). One COCO quirk is kept: brackets become ``-lrb-``/``-rrb-`` etc. after lower-casing, which
the upper-case COCO punctuation list does not match, so they stay as tokens.

Clinical-efficacy metrics (CheXbert, RadGraph) need model weights; they are plugins (:data:`CLINICAL_METRICS`)
that a caller registers with a local checkpoint path. None is registered here.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from a3tune.score.ptb_tokenizer import ptb_tokenize_lines

log = logging.getLogger(__name__)

# The tokens COCO's PTBTokenizer wrapper removes (after the tokenizer has lower-cased everything, so the bracket
# names in upper case never match: that is the COCO behaviour reproduced here).
COCO_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                              "--", "...", ";"})  # fmt: skip
JAVA_TOKENIZER = ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]

Tokenizer = Literal["auto", "ptb-java", "ptb-python"]
ClinicalMetric = Callable[[list[str], list[list[str]]], Mapping[str, float]]
CLINICAL_METRICS: dict[str, ClinicalMetric] = {}


def register_clinical_metric(name: str, fn: ClinicalMetric) -> None:
    """Register a clinical-efficacy metric run by :func:`score_reports` after the COCO metrics.

    ``fn(predictions, references) -> {key: value}``; its keys are reported as ``{name}_{key}``. Such metrics
    (CheXbert label F1, RadGraph F1, ...) need model weights: bind a local checkpoint path into ``fn`` (for
    example with ``functools.partial``) — nothing is downloaded at run time and nothing is registered by default.
    """
    if name in CLINICAL_METRICS:
        raise ValueError(f"clinical metric {name!r} is already registered")
    CLINICAL_METRICS[name] = fn


def ptb_tokenize(text: str) -> str:
    """One text tokenized as COCO does it, in pure Python: PTB tokens, lower case, COCO punctuation removed."""
    return ptb_tokenize_python([text])[0]


def ptb_tokenize_python(texts: Sequence[str]) -> list[str]:
    """COCO's tokenisation of a batch (the lines of one tokenizer input), without Java."""
    return [" ".join(t for t in tokens if t not in COCO_PUNCTUATION) for tokens in ptb_tokenize_lines(list(texts))]


def java_available() -> bool:
    return shutil.which("java") is not None


def _coco_tokenizer_jar() -> Path:
    from pycocoevalcap.tokenizer import ptbtokenizer  # a namespace package: locate the jar from a module

    return Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR


def ptb_tokenize_java(texts: Sequence[str]) -> list[str]:
    """COCO's own tokenisation: the Stanford CoreNLP PTBTokenizer jar (needs Java), then COCO punctuation removed.

    Unlike pycocoevalcap's wrapper it streams through stdin instead of writing a temporary file into site-packages.
    """
    jar = _coco_tokenizer_jar()
    lines = "\n".join(t.replace("\n", " ").replace("\r", " ") for t in texts)
    proc = subprocess.run(["java", "-cp", str(jar), *JAVA_TOKENIZER], input=lines, capture_output=True, text=True,
                          check=True)  # fmt: skip
    out = proc.stdout.split("\n")[: len(texts)]
    out += [""] * (len(texts) - len(out))
    # split on spaces only, as pycocoevalcap does: a fraction or phone number keeps its no-break space
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in COCO_PUNCTUATION) for line in out]


@dataclass(frozen=True)
class ReportScores:
    """Corpus scores (the metrics.json block) and per-sample scores (bleu_4, rouge_l, cider, meteor if run)."""

    corpus: dict[str, float]
    per_sample: pl.DataFrame
    tokenizer: str  # ptb-java or ptb-python, the one that ran


def _as_reference_lists(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    lists = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in lists):
        raise ValueError("every prediction needs at least one reference report")
    return lists


def resolve_tokenizer(tokenizer: Tokenizer = "auto") -> Literal["ptb-java", "ptb-python"]:
    """The tokenizer ``auto`` stands for: the jar when Java is on PATH, else the Python one."""
    if tokenizer == "auto":
        return "ptb-java" if java_available() else "ptb-python"
    if tokenizer not in ("ptb-java", "ptb-python"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb-java' or 'ptb-python', got {tokenizer!r}")
    return tokenizer


def _tokenize(texts: list[str], tokenizer: Literal["ptb-java", "ptb-python"]) -> list[str]:
    return ptb_tokenize_java(texts) if tokenizer == "ptb-java" else ptb_tokenize_python(texts)


def _run_meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # a java subprocess, ended by Meteor.__del__ when this frame releases it
    score, scores = scorer.compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def evaluate_reports(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenizer: Tokenizer = "auto",
    meteor: bool | None = None,
) -> ReportScores:
    """COCO caption metrics of generated reports against one or several references each.

    ``meteor``: None runs METEOR 1.5 when Java is on PATH (else leaves it out with a warning), True requires it,
    False skips it. Registered clinical metrics run on the raw strings. Scores are fractions (CIDEr up to 10).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ref_lists = _as_reference_lists(references)
    if len(predictions) != len(ref_lists) or not ref_lists:
        raise ValueError(f"need as many predictions as references (>0), got {len(predictions)} and {len(ref_lists)}")
    used = resolve_tokenizer(tokenizer)
    # two batches, predictions then references, as pycocoevalcap tokenizes res and gts
    tokenized = _tokenize(list(predictions), used)
    res = {i: [text] for i, text in enumerate(tokenized)}
    flat, cursor, gts = _tokenize([r for refs in ref_lists for r in refs], used), 0, dict[int, list[str]]()
    for i, refs in enumerate(ref_lists):
        gts[i], cursor = flat[cursor : cursor + len(refs)], cursor + len(refs)

    bleu, bleu_samples = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_samples = Rouge().compute_score(gts, res)
    cider, cider_samples = Cider().compute_score(gts, res)
    corpus = {**{f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}, "rouge_l": float(rouge), "cider": float(cider)}
    per_sample = {"bleu_4": bleu_samples[3], "rouge_l": rouge_samples, "cider": cider_samples}

    if meteor is True and not java_available():
        raise RuntimeError("METEOR 1.5 needs a Java runtime on PATH")
    if meteor is None and not java_available():
        log.warning("no Java runtime on PATH: METEOR (the METEOR 1.5 jar) is left out of the report metrics")
    elif meteor is not False:
        corpus["meteor"], per_sample["meteor"] = _run_meteor(gts, res)

    raw_refs = [list(refs) for refs in ref_lists]
    for name, fn in CLINICAL_METRICS.items():
        corpus.update({f"{name}_{key}": float(value) for key, value in fn(list(predictions), raw_refs).items()})
    frame = pl.DataFrame({k: [float(v) for v in values] for k, values in per_sample.items()})
    return ReportScores(corpus=corpus, per_sample=frame, tokenizer=used)


def score_reports(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenizer: Tokenizer = "auto",
    meteor: bool | None = None,
) -> dict[str, float]:
    """Corpus scores: bleu_1..bleu_4, rouge_l, cider, meteor (when run) and registered clinical metrics."""
    return evaluate_reports(predictions, references, tokenizer=tokenizer, meteor=meteor).corpus
