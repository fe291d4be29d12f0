"""VQA metrics against hand-computed cases: normalisation, the reference quirks on and off, summaries."""

from __future__ import annotations

import math

import polars as pl
import pytest

from a3tune.score.vqa_metrics import closed_hit, normalize_answer, open_scores, score_vqa, summarize_vqa, summarize_vqa_table


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("none of them", "0 of them"),
        ("The left lung", "left lung"),
        ("an X-ray,", "x ray"),
        ("yes.", "yes"),
        ("Dont know", "don't know"),
        ("(left) kidney", "left kidney"),
        ("1,000 cells", "1000 cells"),  # a digit-comma-digit removes punctuation instead of spacing it
        ("3.5 cm", "3.5 cm"),
        ("It is 5.", "it is 5"),
    ],
)
def test_normalize_answer_both_modes(text, expected):
    assert normalize_answer(text) == expected
    assert normalize_answer(text, reference_quirks=False) == expected


def test_period_quirks():
    many = "yes" + "." * 40
    assert normalize_answer(many) == "yes" + "." * 8  # only 32 replacements (re.UNICODE passed as count)
    assert normalize_answer(many, reference_quirks=False) == "yes"
    assert normalize_answer("size .5") == "size .5"  # the look-behind is a look-ahead: a period before a digit stays
    assert normalize_answer("size .5", reference_quirks=False) == "size 5"


def test_closed_hit_reference_substring_quirk():
    assert closed_hit("Yes, it is.", "yes")
    assert not closed_hit("No.", "yes")
    assert closed_hit("There is a nodule", "no")  # "no" inside "nodule"
    assert closed_hit("It is not normal", "no")
    assert not closed_hit("Liver", "liver")  # a non-yes/no CLOSED answer needs "yes"/"no" in the prediction
    assert closed_hit("The liver, not the spleen", "liver")


def test_closed_hit_corrected_word_match():
    kw = {"reference_quirks": False}
    assert closed_hit("Yes, it is.", "yes", **kw)
    assert not closed_hit("There is a nodule", "no", **kw)
    assert not closed_hit("It is not normal", "no", **kw)
    assert not closed_hit("yes or no", "yes", **kw)
    assert closed_hit("Liver", "liver", **kw)
    assert closed_hit("the right lung", "Right Lung", **kw)


def test_open_scores_by_hand():
    # gt "left lung" (2 tokens), pred "the lung is on the left side" → "lung is on left side" (5 tokens)
    s = open_scores("the lung is on the left side", "left lung")
    assert s == pytest.approx({"recall": 1.0, "precision": 2 / 5, "f1": 2 * 0.4 / 1.4, "exact": 2 / 5})
    # repeated prediction tokens: the reference counts tp with the prediction's multiplicity (3 of "lung")
    s = open_scores("lung lung lung", "left lung")
    assert s == pytest.approx({"recall": 3 / 4, "precision": 1.0, "f1": 2 * 0.75 / 1.75, "exact": 1 / 3})
    s = open_scores("lung lung lung", "left lung", reference_quirks=False)
    assert s == pytest.approx({"recall": 1 / 2, "precision": 1 / 3, "f1": 0.4, "exact": 0.0})
    assert open_scores("Left lung.", "left lung", reference_quirks=False)["exact"] == 1.0
    assert open_scores("", "left lung") == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "exact": 0.0}
    assert open_scores("heart", "left lung")["recall"] == 0.0
    assert open_scores("two", "2")["recall"] == 1.0


def _predictions() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d", "e"],
            "prediction": ["Yes", "There is a nodule", "the liver", "left lung", "brain"],
            "answer": ["yes", "no", "liver and spleen", "Left Lung", "heart"],
            "answer_type": ["CLOSED", "closed", "open", "OPEN", "open"],
            "organ": ["Lung", "Lung", "Abdomen", "Lung", None],
        }
    )


def test_score_vqa_rows():
    scored = score_vqa(_predictions())
    assert scored["answer_type"].to_list() == ["closed", "closed", "open", "open", "open"]
    assert scored["hit"].to_list() == [1.0, 1.0, None, None, None]
    assert scored["recall"].to_list() == pytest.approx([None, None, 1 / 3, 1.0, 0.0], nan_ok=True)
    assert scored["score"].to_list() == pytest.approx([1.0, 1.0, 1 / 3, 1.0, 0.0])
    corrected = score_vqa(_predictions(), reference_quirks=False)
    assert corrected["hit"].to_list()[:2] == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer_type"):
        score_vqa(_predictions().with_columns(pl.lit("report").alias("answer_type")))


def test_summaries_with_counts():
    scored = score_vqa(_predictions())
    table = summarize_vqa_table(scored)
    assert table["answer_type"].to_list() == ["closed", "open"]
    assert table["n"].to_list() == [2, 3]
    assert table["closed_accuracy"].to_list()[0] == 1.0
    assert table["open_recall"].to_list()[1] == pytest.approx((1 / 3 + 1.0 + 0.0) / 3)

    summary = summarize_vqa(scored)
    assert summary["n"] == 5
    assert summary["closed"] == {"n": 2, "accuracy": 1.0}
    assert summary["open"]["n"] == 3
    assert summary["open"]["recall"] == pytest.approx(4 / 9)
    assert summary["open"]["precision"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert summary["overall"] == pytest.approx((1 + 1 + 1 / 3 + 1 + 0) / 5)
    organs = summary["per_organ"]
    assert set(organs) == {"Lung", "Abdomen"}  # the row without an organ only counts overall
    assert organs["Lung"]["n"] == 3 and organs["Lung"]["closed"] == {"n": 2, "accuracy": 1.0}
    assert organs["Lung"]["open"]["n"] == 1 and organs["Lung"]["open"]["recall"] == 1.0
    assert organs["Abdomen"]["closed"] == {"n": 0, "accuracy": None}
    assert "per_organ" not in summarize_vqa(score_vqa(_predictions().drop("organ")))


def test_open_bleu_as_the_reference_scorer_by_hand():
    from a3tune.score.vqa_metrics import open_bleu

    # normalised "left lung lower lobe" both sides (the article goes): every order matches, no brevity penalty
    assert open_bleu("The left lung lower lobe.", "left lung lower lobe") == pytest.approx(
        {"bleu": 1.0, "bleu_1": 1.0, "bleu_2": 1.0, "bleu_3": 1.0})  # fmt: skip
    # 4 hypothesis words, 2 reference words: unigram precision 2/4, bigram 1/3 ("left lung"), no trigram; BP 1
    s = open_bleu("left lung is enlarged", "left lung")
    assert (s["bleu_1"], s["bleu_2"]) == pytest.approx((0.5, 1 / 3)) and s["bleu_3"] < 1e-300 and s["bleu"] < 1e-100
    # shorter than the reference: brevity penalty exp(1 - 2/1)
    assert open_bleu("lung", "left lung")["bleu_1"] == pytest.approx(math.exp(-1))
