"""Report metrics against hand-worked values of the COCO caption definitions, and pycocoevalcap itself."""

from __future__ import annotations

import math

import pytest

from a3tune.score import report_metrics
from a3tune.score.report_metrics import (
    evaluate_reports,
    java_available,
    ptb_tokenize,
    ptb_tokenize_java,
    ptb_tokenize_python,
    register_clinical_metric,
    resolve_tokenizer,
    score_reports,
)

needs_java = pytest.mark.skipif(not java_available(), reason="needs a Java runtime")

PAIRS = [
    ("The heart size is normal. No pleural effusion.", ["Heart size is normal, no pleural effusion or pneumothorax."]),
    ("Lungs are clear bilaterally.", ["The lungs are clear.", "No focal consolidation; lungs clear."]),
    ("There is a small left-sided effusion (stable).", ["Small left pleural effusion, unchanged."]),
    ("No acute cardiopulmonary process.", ["No acute cardiopulmonary abnormality.", "Normal chest x-ray."]),
    ("Patient's T-spine shows degenerative changes; 1.5cm nodule.", ["Degenerative changes of the thoracic spine."]),
]


def test_ptb_tokenize():
    assert ptb_tokenize("The patient's heart, normal.") == "the patient 's heart normal"
    assert ptb_tokenize('Don\'t see (any) effusion -- 1.5cm nodule... x-ray/CT "stable"') == (
        "do n't see -lrb- any -rrb- effusion 1.5 cm nodule x-ray/ct stable"
    )
    assert ptb_tokenize("cannot, e.g. 1,000") == "can not e.g. 1,000"


@needs_java
def test_python_tokenizer_matches_java_ptb():
    texts = [p for p, _ in PAIRS] + [r for _, refs in PAIRS for r in refs] + ["", "won't i'm they'd 50% a&b 10:30 [x]"]
    assert ptb_tokenize_python(texts) == ptb_tokenize_java(texts)


# Reports as radiologists write them (IU-Xray / MIMIC-CXR style, de-identified with XXXX), and model outputs.
REPORTS = [
    ("The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
     "The cardiomediastinal silhouette is within normal limits for size and contour. The lungs are normally inflated "
     "without evidence of focal airspace disease, pleural effusion, or pneumothorax. Stable calcified granuloma within "
     "the right upper lung. No acute bone abnormality."),
    ("Heart size normal.Lungs clear. No pneumothorax or pleural effusion.",
     "Heart size and pulmonary vascularity appear within normal limits. A large hiatal hernia is noted. The lungs are "
     "free of focal airspace disease. No pneumothorax or pleural effusion is seen. Degenerative changes of the T-spine."),
    ("There is a 3.2 x 4.1 cm opacity in the left lower lobe, concerning for pneumonia.",
     "Left lower lobe airspace opacity measuring approximately 3.2 x 4.1 cm, consistent with pneumonia. Dr. XXXX was "
     "notified of the findings at 10:30 a.m. on XXXX. Follow-up radiographs in 4-6 weeks."),
    ("Compared with CT. There is no change in the 5mm nodule (right apex).",
     "Comparison: CT chest XXXX. Findings: 1. Unchanged 5 mm nodule at the right apex.There is no new nodule. "
     "2. Normal heart size. Impression: Stable exam; no acute cardiopulmonary process."),
    ("XXXX XXXX are intact. Lungs are hyperexpanded, e.g. COPD.",
     "The lungs are hyperexpanded with flattening of the diaphragms, i.e. emphysema. XXXX.In addition, "
     "there are postoperative changes (median sternotomy wires). No pneumothorax."),
    ("No acute cardiopulmonary abnormality.",
     "No acute cardiopulmonary abnormality. The patient's heart size is upper limits of normal; no effusion."),
]


@needs_java
def test_default_report_metrics_equal_pycocoevalcap():
    """The whole pipeline against pycocoevalcap run directly, its own tokenizer wrapper included.

    METEOR is the same pycocoevalcap class on the same tokenized strings (checked here), so it is not run twice
    (a METEOR start takes about 20 s on two cores).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, refs = [p for p, _ in REPORTS], [r for _, r in REPORTS]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r}] for i, r in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    expected = dict(zip((f"bleu_{n}" for n in range(1, 5)), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    expected |= {"rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}
    for tokenizer_name in ("auto", "ptb-python"):
        used = resolve_tokenizer(tokenizer_name)
        assert report_metrics._tokenize(preds, used) == [res[i][0] for i in range(len(preds))]
        assert report_metrics._tokenize(refs, used) == [gts[i][0] for i in range(len(refs))]
        result = evaluate_reports(preds, refs, tokenizer=tokenizer_name, meteor=False)
        assert result.tokenizer == ("ptb-java" if tokenizer_name == "auto" else "ptb-python")
        for key, value in expected.items():
            assert result.corpus[key] == pytest.approx(value, abs=1e-6), (tokenizer_name, key)


def test_identical_reports_score_one():
    text = "the heart size is normal and the lungs are clear"
    scores = score_reports([text, "no pleural effusion is seen"], [text, "no pleural effusion is seen"], meteor=False)
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert scores[key] == pytest.approx(1.0, abs=1e-6)
    assert set(scores) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}


def test_bleu_brevity_penalty_by_hand():
    # 4 hypothesis tokens all in the 6-token reference; bigrams "heart size", "size is" match, "is normal" does not
    s = score_reports(["heart size is normal"], ["the heart size is not normal"], meteor=False)
    bp = math.exp(1 - 6 / 4)
    assert s["bleu_1"] == pytest.approx(bp, rel=1e-6)
    assert s["bleu_2"] == pytest.approx(bp * math.sqrt(2 / 3), rel=1e-6)
    # closest reference length (7, not the shortest 2) sets the penalty; clipped unigram precision 3/5
    s = score_reports(["lungs are clear bilaterally today"], [["lungs clear", "the lungs are clear on both sides"]], meteor=False)
    assert s["bleu_1"] == pytest.approx(0.6 * math.exp(1 - 7 / 5), rel=1e-6)


def test_bleu_is_corpus_level_with_clipping():
    # matches 4 + 1 (the repeated "the" is clipped to one) over 7 tokens; lengths 7 vs 8 → BP exp(1 - 8/7)
    s = score_reports(["heart size is normal", "the the the"], ["the heart size is not normal", "the heart"], meteor=False)
    assert s["bleu_1"] == pytest.approx(5 / 7 * math.exp(1 - 8 / 7), rel=1e-6)


def test_rouge_l_by_hand():
    def f(p: float, r: float) -> float:
        return (1 + 1.2**2) * p * r / (r + 1.2**2 * p)

    # LCS "heart size is normal" = 4 (P 4/4, R 4/6); LCS "effusion seen" = 2 (P 2/3, R 2/4)
    preds, refs = ["heart size is normal", "no effusion seen"], ["the heart size is not normal", "effusion is not seen"]
    result = evaluate_reports(preds, refs, meteor=False)
    assert result.per_sample["rouge_l"].to_list() == pytest.approx([f(1, 4 / 6), f(2 / 3, 1 / 2)])
    assert result.corpus["rouge_l"] == pytest.approx((f(1, 4 / 6) + f(2 / 3, 1 / 2)) / 2)
    # COCO takes the best precision and the best recall over references separately
    assert score_reports(["a b c d"], [["a b", "a b c d e f g h"]], meteor=False)["rouge_l"] == pytest.approx(1.0)


def test_cider_d_two_sample_corpus_by_hand():
    # N = 2 samples, every reference n-gram has df 1, so every idf is log 2 and cancels in the cosine.
    # Sample 1 (identical): n=1 and n=2 cosines 1, n=3,4 empty → mean 2/4, ×10 = 5.
    # Sample 2: unigram cosine 2/(√2·√3), bigram "lungs clear" unmatched, length (bigram count) 1 vs 2 → e^(-1/72).
    result = evaluate_reports(["heart normal", "lungs clear"], ["heart normal", "lungs are clear"], meteor=False)
    second = 10 / 4 * 2 / math.sqrt(6) * math.exp(-1 / 72)
    assert result.per_sample["cider"].to_list() == pytest.approx([5.0, second])
    assert result.corpus["cider"] == pytest.approx((5.0 + second) / 2)
    assert score_reports(["heart normal"], ["heart normal"], meteor=False)["cider"] == 0.0  # one sample: idf log 1


def test_equals_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    res = {i: [ptb_tokenize(p)] for i, p in enumerate(preds)}
    gts = {i: [ptb_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result = evaluate_reports(preds, refs, meteor=False, tokenizer="ptb-python")
    assert [result.corpus[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, rel=1e-12)
    assert result.corpus["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert result.corpus["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert result.per_sample.columns == ["bleu_4", "rouge_l", "cider"] and result.per_sample.height == 5


@needs_java
def test_meteor_with_java():
    result = evaluate_reports(["the heart is normal", "no pleural effusion", "lungs clear"],
                              ["the heart is normal", "small pleural effusion", "heart enlarged"], meteor=True)  # fmt: skip
    same, partial, disjoint = result.per_sample["meteor"].to_list()
    assert same > partial > disjoint == 0.0
    assert 0.0 < result.corpus["meteor"] <= 1.0


def test_meteor_left_out_without_java(monkeypatch, caplog):
    monkeypatch.setattr(report_metrics, "java_available", lambda: False)
    assert resolve_tokenizer() == "ptb-python"
    assert "meteor" not in score_reports(["heart normal"], ["heart normal"])
    assert "METEOR" in caplog.text
    with pytest.raises(RuntimeError, match="Java"):
        score_reports(["heart normal"], ["heart normal"], meteor=True)


def test_input_checks_and_clinical_plugins(monkeypatch):
    with pytest.raises(ValueError):
        score_reports(["a", "b"], ["a"], meteor=False)
    with pytest.raises(ValueError):
        score_reports(["a"], [[]], meteor=False)
    monkeypatch.setattr(report_metrics, "CLINICAL_METRICS", {})
    register_clinical_metric("stub", lambda preds, refs: {"n_refs": sum(map(len, refs))})
    with pytest.raises(ValueError, match="already"):
        register_clinical_metric("stub", lambda preds, refs: {})
    assert score_reports(["a b", "c"], [["a b", "a"], "c"], meteor=False)["stub_n_refs"] == 3.0
