"""VQA metrics with the LLaVA-Med conventions (reference a3tune-method.md §9.3), reference quirks by default.

The A³Tune numbers come from LLaVA-Med's ``run_eval.py``: answers are normalised the VQA way (lower case,
punctuation, number words, articles, contractions), CLOSED questions are scored by a substring test and OPEN
questions by token recall (also precision, F1 and a so-called "exact match"). That scorer has bugs which change the
numbers; to be comparable with the paper the default here reproduces them (``reference_quirks=True``):

- the period-stripping regular expression is applied with ``re.UNICODE`` (= 32) as the replacement *count*, so only
  the first 32 periods of an answer are stripped, and its intended "no digit before" look-behind is written as a
  look-ahead, so it never looks behind: a period is stripped whenever no digit follows it ("5." → "5") and kept
  whenever one does, digit before or not ("3.5" and also ".5" kept);
- a CLOSED hit needs "yes" or "no" anywhere in the prediction and the ground truth as a substring of it, so the
  answer "no" is matched by "not", "nodule" or "know";
- OPEN scores normalise twice (``normalize_word`` again inside the F1 helper), count true positives with the
  *prediction's* multiplicities, and the "exact match" is the number of distinct ground-truth words found in the
  prediction divided by the prediction's length (BLEU-1's unigram precision, not an exact match).

``reference_quirks=False`` is the corrected scorer: every non-decimal period is stripped, CLOSED is a whole-word
match, OPEN counts are clipped multiset overlaps and "exact" is a true exact match of the normalised strings.
All scores are fractions in [0, 1] (the reference prints percentages).

OPEN answers are also scored by NLTK's sentence BLEU, as the reference scorer reports it: the answer and the
prediction normalised once and split on spaces, one reference, NLTK's defaults (no smoothing): ``bleu`` with the
uniform 4-gram weights, ``bleu_1``/``bleu_2``/``bleu_3`` with weights (1,0,0,0), (0,1,0,0), (0,0,1,0), i.e. the
1-, 2- and 3-gram precisions times the brevity penalty. NLTK returns 0 when an order has no match (a one- or
two-word answer has no 3-gram, so its ``bleu`` is 0), with a warning the reference silences; so does this.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import polars as pl

# The VQA evaluation's punctuation: replaced by a space, or removed outright where it touches a space or the text
# holds a comma between digits. Periods are handled separately (decimal points), apostrophes are kept (contractions).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The reference pattern: "(?!<=" is a negative look-ahead for the text "<=" + digit, always true at a period.
PERIOD_REFERENCE = re.compile(r"(?!<=\d)(\.)(?!\d)")
PERIOD_REFERENCE_COUNT = re.UNICODE  # the flag passed positionally as ``count``: 32 replacements at most
# The corrected pattern: strip every period that is not a decimal point between two digits.
PERIOD_CORRECTED = re.compile(r"(?<!\d)\.|\.(?!\d)")

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})

# The VQA evaluation's contraction map (written without apostrophes → with). Its capitalised keys ("Im", "Ive",
# "Id've", "I'dve") are left out: they are looked up after lower-casing and never match. "somebody'd" → "somebodyd"
# is the map's own inverted entry, kept because it changes what the reference scores.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

OPEN_COLUMNS = ("recall", "precision", "f1", "exact", "bleu", "bleu_1", "bleu_2", "bleu_3")
BLEU_WEIGHTS = {"bleu": (0.25, 0.25, 0.25, 0.25), "bleu_1": (1, 0, 0, 0), "bleu_2": (0, 1, 0, 0), "bleu_3": (0, 0, 1, 0)}
POLAR = ("yes", "no")


def _strip_punctuation(text: str) -> str:
    """VQA punctuation step; the remove-or-space decision looks at the original text, as the reference does."""
    remove = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if remove or f"{p} " in text or f" {p}" in text else " ")
    return out


def _strip_periods(text: str, reference_quirks: bool) -> str:
    if reference_quirks:
        return PERIOD_REFERENCE.sub("", text, PERIOD_REFERENCE_COUNT)
    return PERIOD_CORRECTED.sub("", text)


def normalize_answer(text: str, *, reference_quirks: bool = True) -> str:
    """LLaVA-Med's ``normalize_word``: punctuation, periods, lower case, number words, articles, contractions.

    With ``reference_quirks`` the period step reproduces the reference bugs: at most 32 periods are stripped (the
    ``re.UNICODE`` flag is passed as the count), so a long answer keeps the periods after the 32nd ("normal." then
    no longer matches "normal"), and whether a period is stripped depends only on the next character: kept before a
    digit (".5" stays ".5"), stripped otherwise. Without quirks every period is stripped except a decimal point
    between two digits (".5" → "5").
    """
    text = _strip_periods(_strip_punctuation(text), reference_quirks)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def closed_hit(prediction: str, answer: str, *, reference_quirks: bool = True) -> bool:
    """CLOSED-question hit on the normalised strings.

    Reference: the prediction must contain "yes" or "no" and the answer as substrings (so "no" hits "not",
    "nodule"; a non-yes/no CLOSED answer only scores when the prediction also contains "yes"/"no" somewhere).
    Corrected: the answer's words must occur as consecutive whole words of the prediction and, for a yes/no
    answer, the opposite word must not occur.
    """
    pred = normalize_answer(prediction, reference_quirks=reference_quirks)
    gt = normalize_answer(answer, reference_quirks=reference_quirks)
    if reference_quirks:
        return ("yes" in pred or "no" in pred) and gt in pred
    pred_words, gt_words = pred.split(), gt.split()
    if not gt_words:
        return False
    if gt in POLAR and POLAR[1 - POLAR.index(gt)] in pred_words:
        return False
    n = len(gt_words)
    return any(pred_words[i : i + n] == gt_words for i in range(len(pred_words) - n + 1))


def open_scores(prediction: str, answer: str, *, reference_quirks: bool = True) -> dict[str, float]:
    """OPEN-question token scores: recall (the "Open" column), precision, F1 and "exact".

    Reference: both strings normalised twice; true positives count the prediction's occurrences of words that are
    in the answer (recall = tp / (tp + answer tokens not in the prediction)); "exact" = distinct answer words found
    in the prediction / prediction tokens; all zero when either side is empty or nothing matches.
    Corrected: one normalisation, clipped multiset overlap (recall = overlap / answer tokens, precision = overlap /
    prediction tokens) and "exact" = 1.0 when the normalised strings are equal.
    """
    pred = normalize_answer(prediction, reference_quirks=reference_quirks)
    gt = normalize_answer(answer, reference_quirks=reference_quirks)
    if reference_quirks:
        pred, gt = normalize_answer(pred), normalize_answer(gt)
    pred_counts, gt_counts = Counter(pred.split()), Counter(gt.split())
    n_pred = sum(pred_counts.values())
    if reference_quirks:
        tp = sum(c for w, c in pred_counts.items() if w in gt_counts)
        fn = sum(c for w, c in gt_counts.items() if w not in pred_counts)
        recall_denominator = tp + fn
        exact = sum(1 for w in gt_counts if w in pred_counts) / n_pred if n_pred else 0.0
    else:
        tp = sum((pred_counts & gt_counts).values())
        recall_denominator = sum(gt_counts.values())
        exact = float(bool(gt) and pred == gt)
    if not pred_counts or not gt_counts or tp == 0:
        return {"recall": 0.0, "precision": 0.0, "f1": 0.0, "exact": exact}
    precision, recall = tp / n_pred, tp / recall_denominator
    return {"recall": recall, "precision": precision, "f1": 2 * precision * recall / (precision + recall), "exact": exact}


def open_bleu(prediction: str, answer: str, *, reference_quirks: bool = True) -> dict[str, float]:
    """NLTK sentence BLEU of an OPEN answer as the reference computes it (module docstring): bleu, bleu_1..3."""
    from nltk.translate.bleu_score import sentence_bleu

    pred = normalize_answer(prediction.lower(), reference_quirks=reference_quirks).split()
    gt = normalize_answer(answer.lower(), reference_quirks=reference_quirks).split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on every zero-count order, as the reference's run shows
        return {key: float(sentence_bleu([gt], pred, weights=weights)) for key, weights in BLEU_WEIGHTS.items()}


def score_vqa(predictions: pl.DataFrame, *, reference_quirks: bool = True) -> pl.DataFrame:
    """Per-row scores: ``hit`` for closed rows, ``recall``/``precision``/``f1``/``exact`` for open rows (else null).

    Input columns: sample_id, prediction, answer, answer_type (closed/open, any case), optional organ. The output
    keeps those columns (answer_type lower-cased) and adds ``score``: the row's headline number (hit or recall).
    """
    keep = [c for c in ("sample_id", "prediction", "answer", "answer_type", "organ") if c in predictions.columns]
    table = predictions.select(keep).with_columns(pl.col("answer_type").str.to_lowercase())
    unknown = set(table["answer_type"].unique().to_list()) - {"closed", "open"}
    if unknown:
        raise ValueError(f"answer_type must be closed or open, got {sorted(map(str, unknown))}")
    rows: list[dict[str, float | None]] = []
    for pred, gt, kind in zip(table["prediction"].fill_null(""), table["answer"].fill_null(""), table["answer_type"]):
        if kind == "closed":
            hit = float(closed_hit(pred, gt, reference_quirks=reference_quirks))
            rows.append({"hit": hit, **dict.fromkeys(OPEN_COLUMNS), "score": hit})
        else:
            scores = open_scores(pred, gt, reference_quirks=reference_quirks)
            scores |= open_bleu(pred, gt, reference_quirks=reference_quirks)
            rows.append({"hit": None, **scores, "score": scores["recall"]})
    schema = dict.fromkeys(("hit", *OPEN_COLUMNS, "score"), pl.Float64)
    return table.hstack(pl.DataFrame(rows, schema=schema, orient="row"))


def _aggregations() -> list[pl.Expr]:
    closed, opened = pl.col("answer_type") == "closed", pl.col("answer_type") == "open"
    return [
        pl.len().cast(pl.Int64).alias("n"),
        closed.sum().cast(pl.Int64).alias("n_closed"),
        opened.sum().cast(pl.Int64).alias("n_open"),
        pl.col("hit").mean().alias("closed_accuracy"),
        *(pl.col(c).mean().alias(f"open_{c}") for c in OPEN_COLUMNS),
        pl.col("score").mean().alias("overall"),
    ]


def summarize_vqa_table(scored: pl.DataFrame, by: Sequence[str] = ("answer_type",)) -> pl.DataFrame:
    """Means per group of ``by`` (columns absent from ``scored`` are skipped; none left → one overall row).

    Columns: the group keys, n, n_closed, n_open, closed_accuracy (mean hit), open_recall/precision/f1/exact and
    overall (mean of the per-row headline score: closed hit or open recall); a mean over no rows is null.
    """
    keys = [c for c in by if c in scored.columns]
    if not keys:
        return scored.select(_aggregations())
    return scored.group_by(keys).agg(_aggregations()).sort(keys, nulls_last=True)


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "n": row["n"],
        "closed": {"n": row["n_closed"], "accuracy": row["closed_accuracy"]},
        "open": {"n": row["n_open"], **{c: row[f"open_{c}"] for c in OPEN_COLUMNS}},
        "overall": row["overall"],
    }


def summarize_vqa(scored: pl.DataFrame) -> dict[str, Any]:
    """The metrics.json block: closed accuracy, open recall/precision/F1/exact and overall, with counts.

    ``{"n", "closed": {"n", "accuracy"}, "open": {"n", "recall", "precision", "f1", "exact"}, "overall"}`` for all
    rows, plus ``"per_organ": {organ: same}`` when an ``organ`` column holds values (rows without one are left out
    of that block). Means over no rows are None.
    """
    summary = _metrics(summarize_vqa_table(scored, by=()).row(0, named=True))
    if "organ" in scored.columns and scored["organ"].drop_nulls().len():
        per_organ = summarize_vqa_table(scored.filter(pl.col("organ").is_not_null()), by=("organ",))
        summary["per_organ"] = {row["organ"]: _metrics(row) for row in per_organ.iter_rows(named=True)}
    return summary
