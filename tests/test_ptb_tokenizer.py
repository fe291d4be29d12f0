"""The pure-Python PTB tokenizer against the CoreNLP 3.4.1 jar COCO runs, on a large offline corpus.

The corpus: the docstrings of packages installed in this environment (scipy, numpy, nltk, ...), split into
sentences and kept when they are written in the report-text alphabet (``ptb_tokenizer.REPORT_TEXT``), plus
constructed radiology sentences (measurements, lists, abbreviations, de-identification tokens, missing spaces after
periods). Both tokenizers see the same batch, in one Java call.
"""

from __future__ import annotations

import itertools
import re
import sysconfig
from pathlib import Path

import pytest

from a3tune.score.ptb_tokenizer import REPORT_TEXT, ptb_tokenize_lines, ptb_tokens
from a3tune.score.report_metrics import java_available, ptb_tokenize_java, ptb_tokenize_python

needs_java = pytest.mark.skipif(not java_available(), reason="the reference tokenizer is the CoreNLP jar: needs Java")

DOCSTRING = re.compile(r'"""(.*?)"""', re.S)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
PACKAGES = ("scipy", "numpy", "nltk", "polars", "snakemake", "matplotlib", "transformers")
N_DOCSTRING_SENTENCES = 22_000


def docstring_sentences(n: int) -> list[str]:
    """The first ``n`` distinct report-alphabet sentences of the packages' docstrings (files in sorted order)."""
    site, out = Path(sysconfig.get_paths()["purelib"]), dict[str, None]()
    for package in PACKAGES:
        for path in sorted((site / package).rglob("*.py")):
            for doc in DOCSTRING.findall(path.read_text(errors="ignore")):
                for paragraph in re.split(r"\n\s*\n", doc):
                    for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
                        if 20 <= len(sentence) <= 300 and REPORT_TEXT.fullmatch(sentence) and \
                                len(re.findall("[A-Za-z]{2,}", sentence)) >= 4:  # fmt: skip
                            out[sentence] = None
            if len(out) >= n:
                return list(out)[:n]
    return list(out)


FINDINGS = ["The heart size is normal", "No focal consolidation", "There is a 3.2 x 4.1 cm nodule in the right apex",
            "XXXX XXXX are intact", "Stable 1.5cm calcified granuloma", "Dr. XXXX was notified at 10:30",
            "Mild degenerative changes of the T-spine/L-spine", "Lungs are clear bilaterally; no effusion",
            "Compared with CT. There is no change", "Status post CABG (median sternotomy wires)",
            "Left-sided PICC line terminates in the SVC", "No acute cardiopulmonary abnormality",
            "Heart size upper limits of normal, e.g. cardiomegaly", "Findings: 1. Clear lungs 2. Normal heart",
            "The patient's XXXX is unremarkable", "Interval decrease in the size of the 5 mm nodule, i.e. resolving",
            "Mediastinal contours don't appear widened", "Small [left] effusion vs. atelectasis",
            "\"Stable\" appearance of the apex", "Pulmonary vasculature is within normal limits (see fig. 2)"]  # fmt: skip
JOINS = [". ", ".", ", ", "; ", " - ", ". XXXX. ", "... ", ". 2. "]


def radiology_sentences() -> list[str]:
    """Pairs of findings joined with and without spaces after the period (``apex.There``, ``XXXX.In``)."""
    return [a + join + b + "." for a, b in itertools.permutations(FINDINGS, 2) for join in JOINS[:4]] + \
        [a + join + b for a, b in itertools.combinations(FINDINGS, 2) for join in JOINS[4:]]  # fmt: skip


def test_hand_checked_tokens():
    assert ptb_tokens("No effusion at the apex.There is XXXX.In Dr. Smith's CT. The") == [
        "no", "effusion", "at", "the", "apex.there", "is", "xxxx.in", "dr.", "smith", "'s", "ct.", ".", "the"]  # fmt: skip
    assert ptb_tokens('Don\'t see (any) 3.2 x 4.1cm nodule -- "stable", cannot e.g. 1 1/2') == [
        "do", "n't", "see", "-lrb-", "any", "-rrb-", "3.2", "x", "4.1", "cm", "nodule", "--", "``", "stable", "''", ",",
        "can", "not", "e.g.", "1\u00a01/2"]  # fmt: skip
    # the next line's first word decides whether an acronym ends a sentence
    assert ptb_tokenize_lines(["value of x.", "The end"])[0] == ["value", "of", "x", "."]
    assert ptb_tokenize_lines(["value of x.", "the end"])[0] == ["value", "of", "x."]


@needs_java
def test_python_tokenizer_equals_the_jar_on_20000_sentences():
    docs = docstring_sentences(N_DOCSTRING_SENTENCES)
    sentences = docs + radiology_sentences()
    assert len(docs) >= 20_000 and len(sentences) >= 22_000
    java, python = ptb_tokenize_java(sentences), ptb_tokenize_python(sentences)
    mismatches = [(s, j, p) for s, j, p in zip(sentences, java, python) if j != p]
    assert not mismatches, f"{len(mismatches)} of {len(sentences)} differ, e.g. {mismatches[:3]}"
