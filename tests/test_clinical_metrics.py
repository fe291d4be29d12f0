"""CheXbert label F1 on a tiny BERT: the checkpoint layout loads strictly, the labeler gives 14 labels per
report, the F1 equals the published definition on hand-made labels, and missing paths are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from a3tune.score import report_metrics
from a3tune.score.clinical_metrics import (
    CONDITIONS,
    TOP5,
    CheXbertLabeler,
    chexbert_metric,
    chexbert_scores,
    encode_report,
    label_f1,
    label_reports,
    load_chexbert,
    positive_labels,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "no", "acute", "cardio", "##pulmonary", "process",
         "mild", "cardiomegaly", "small", "left", "pleural", "effusion", "edema", "lungs", "are", "clear"]  # fmt: skip


@pytest.fixture(scope="module")
def chexbert(tmp_path_factory) -> tuple[Path, Path]:
    """A local ``bert-base-uncased``-style folder (config.json, vocab.txt, tokenizer_config.json) of a 2-layer BERT
    with hidden size 32, and a random-weight ``chexbert.pth`` in CheXbert's DataParallel layout."""
    from a3tune.compat import ensure_torchvision

    ensure_torchvision()
    from transformers import BertConfig

    tmp = tmp_path_factory.mktemp("chexbert")
    bert = tmp / "bert-base-uncased"
    bert.mkdir()
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)  # fmt: skip
    config.save_pretrained(bert)
    (bert / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (bert / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    torch.manual_seed(0)
    state = {f"module.{key}": value for key, value in CheXbertLabeler(config).state_dict().items()}
    torch.save({"epoch": 3, "model_state_dict": state}, tmp / "chexbert.pth")
    return tmp / "chexbert.pth", bert


def _resave(chexbert, tmp_path: Path, edit) -> Path:
    saved = torch.load(chexbert[0], weights_only=True)
    edit(saved["model_state_dict"])
    torch.save(saved, tmp_path / "edited.pth")
    return tmp_path / "edited.pth"


def test_the_checkpoint_layout_loads_and_labels_14_observations(chexbert):
    model, tokenizer = load_chexbert(*chexbert)
    saved = torch.load(chexbert[0], weights_only=True)["model_state_dict"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key.removeprefix("module.")], value) for key, value in saved.items())
    assert [head.out_features for head in model.linear_heads] == [4] * 13 + [2]
    reports = ["No acute cardiopulmonary process.", "Mild cardiomegaly.\n\nSmall left  pleural effusion.", ""]
    classes = label_reports(model, tokenizer, reports, batch_size=2)
    assert classes.shape == (3, 14) and classes[:, :13].max() <= 3 and classes[:, 13].max() <= 1
    # padded in a batch or alone: the same classes (the attention mask hides the padding)
    alone = np.concatenate([label_reports(model, tokenizer, [r]) for r in reports])
    assert (alone == classes).all()


def test_reports_are_encoded_as_chexbert_does(chexbert):
    _, tokenizer = load_chexbert(*chexbert)
    ids = encode_report("  Mild\ncardiomegaly.  ", tokenizer)
    assert ids == [2, VOCAB.index("mild"), VOCAB.index("cardiomegaly"), VOCAB.index("."), 3]
    assert encode_report("", tokenizer) == [2, 3]
    long = encode_report("edema " * 600, tokenizer)
    assert len(long) == 512 and long[0] == 2 and long[-1] == 3 and long[-2] == VOCAB.index("edema")


@pytest.mark.parametrize("edit, named", [
    (lambda state: state.pop("module.linear_heads.13.bias"), "missing ['linear_heads.13.bias']"),
    (lambda state: state.pop("module.bert.encoder.layer.1.output.dense.weight"),
     "missing ['bert.encoder.layer.1.output.dense.weight']"),
    (lambda state: state.update({"module.linear_heads.14.weight": torch.zeros(2, 32)}),
     "unexpected ['linear_heads.14.weight']"),
])  # fmt: skip
def test_a_missing_or_extra_tensor_raises_naming_it(chexbert, tmp_path, edit, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_chexbert(_resave(chexbert, tmp_path, edit), chexbert[1])


def test_a_saved_position_ids_buffer_loads_and_a_wrong_shape_is_named(chexbert, tmp_path):
    buffer = _resave(chexbert, tmp_path, lambda s: s.update({"module.bert.embeddings.position_ids": torch.arange(512)[None]}))
    load_chexbert(buffer, chexbert[1])
    wrong = _resave(chexbert, tmp_path, lambda s: s.update({"module.linear_heads.0.weight": torch.zeros(2, 32)}))
    with pytest.raises(ValueError, match="linear_heads.0.weight"):
        load_chexbert(wrong, chexbert[1])


def test_missing_paths_are_named_and_nothing_is_downloaded(chexbert, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"score.clinical.chexbert.checkpoint: .*nowhere.pth"):
        chexbert_metric(tmp_path / "nowhere.pth", chexbert[1])
    with pytest.raises(FileNotFoundError, match=r"score.clinical.chexbert.bert: .*no-bert.*config.json"):
        chexbert_metric(chexbert[0], tmp_path / "no-bert")
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):  # a hub name is a missing path, not a download
        load_chexbert(chexbert[0], "bert-base-uncased")


def test_f1_is_the_published_definition_on_hand_made_labels():
    # 3 reports x 3 observations. Obs 0: tp 1, fp 1, fn 1 (F1 1/2); obs 1: tp 2 (F1 1); obs 2: never positive (F1 0)
    refs = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool)
    hyps = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]], bool)
    scores = label_f1(refs, hyps)
    # micro: tp 3, fp 1, fn 1 -> precision 3/4, recall 3/4, F1 3/4; macro: (1/2 + 1 + 0) / 3
    assert scores == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "f1_macro": 0.5})
    assert label_f1(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                                        "f1_macro": 0.0}  # fmt: skip


def test_uncertain_counts_as_positive_by_default_and_the_top5_subset():
    assert positive_labels(np.array([0, 1, 2, 3])).tolist() == [False, True, False, True]
    assert positive_labels(np.array([0, 1, 2, 3]), uncertain_positive=False).tolist() == [False, True, False, False]
    refs, hyps = np.zeros((2, 14), np.int64), np.zeros((2, 14), np.int64)
    edema, fracture = CONDITIONS.index("Edema"), CONDITIONS.index("Fracture")
    refs[0, edema], hyps[0, edema] = 1, 3  # uncertain edema against positive edema
    refs[1, fracture], hyps[1, fracture] = 1, 2  # a missed fracture: outside the 5
    scores = chexbert_scores(refs, hyps)
    assert scores["f1_5"] == 1.0 and scores["f1_macro_5"] == pytest.approx(1 / 5) and "Edema" in TOP5
    assert scores["precision_14"] == 1.0 and scores["recall_14"] == 0.5 and scores["f1_14"] == pytest.approx(2 / 3)
    assert scores["f1_macro_14"] == pytest.approx(1 / 14)
    strict = chexbert_scores(refs, hyps, uncertain_positive=False)
    assert strict["f1_5"] == 0.0 and strict["f1_14"] == 0.0


def test_registered_metric_reaches_the_report_scores(chexbert, monkeypatch):
    monkeypatch.setattr(report_metrics, "CLINICAL_METRICS", {})
    report_metrics.register_clinical_metric("chexbert", chexbert_metric(*chexbert))
    preds, refs = ["Mild cardiomegaly.", "No acute process."], [["Mild cardiomegaly."], ["Lungs are clear."]]
    corpus = report_metrics.score_reports(preds, refs, tokenizer="ptb-python", meteor=False)
    keys = {f"chexbert_{score}_{n}" for score in ("precision", "recall", "f1", "f1_macro") for n in (14, 5)}
    assert keys <= set(corpus) and all(0 <= corpus[k] <= 1 for k in keys)


def test_score_gather_cli_names_a_missing_checkpoint_in_one_line(chexbert, tmp_path, capsys, monkeypatch):
    from a3tune.cli import main

    monkeypatch.setattr(report_metrics, "CLINICAL_METRICS", {})
    settings = {"checkpoint": str(tmp_path / "gone.pth"), "bert": str(chexbert[1]), "uncertain_positive": True}
    code = main(["score_gather", "--out", str(tmp_path), "--chexbert", json.dumps(settings), str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("a3tune score_gather: error: CheXbert: score.clinical.chexbert.checkpoint")
    assert "gone.pth" in err[-1] and not report_metrics.CLINICAL_METRICS
