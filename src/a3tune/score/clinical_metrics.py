"""CheXbert label F1: a clinical-efficacy report metric, run offline from a local CheXbert checkpoint.

The CheXbert labeler (Smit et al., EMNLP 2020; github.com/stanfordmlgroup/CheXbert, ``src/models/bert_labeler.py``)
is a ``bert-base-uncased`` encoder whose [CLS] state feeds 14 linear heads: 13 observations with 4 classes (0 blank,
1 positive, 2 negative, 3 uncertain) and "No Finding" with 2 (0 blank, 1 positive). Its released ``chexbert.pth``
is ``{"model_state_dict": ...}`` saved from ``nn.DataParallel``: every key carries the ``module.`` prefix, then
``bert.<BertModel keys>`` (pooler included) and ``linear_heads.<i>.weight/bias``. A report is labelled as CheXbert's
``label.py`` does it: whitespace collapsed, WordPiece tokens of the uncased BERT tokenizer, ``[CLS] … [SEP]`` cut to
512 ids, argmax of each head.

The metric follows the f1chexbert package (PyPI ``f1chexbert``, used by ViLMedic, RadGraph and most R2Gen-style
report-generation evaluations): predictions and the first reference of each sample are labelled by the same model;
a label is positive when its class is positive **or uncertain** (f1chexbert's "rrg" mode; ``uncertain_positive=False``
counts only "positive"); then precision, recall and F1 of the positive labels as scikit-learn's
``classification_report`` computes them for multilabel input:

- micro: TP, FP and FN summed over samples and observations, F1 = 2·TP / (2·TP + FP + FN);
- macro: the unweighted mean of each observation's F1. An observation that neither the references nor the
  predictions mark positive has F1 0 and still counts in the mean (scikit-learn's ``zero_division`` default);

over the 14 observations and over the common 5 (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).

Nothing is downloaded: the checkpoint and the BERT folder (config.json, vocab.txt, tokenizer_config.json of
``bert-base-uncased``) are local paths, read with ``local_files_only=True``; only the configuration and tokenizer
come from the BERT folder, every weight comes from the checkpoint, loaded strictly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONDITIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
              "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
              "Support Devices", "No Finding")  # fmt: skip
TOP5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
POSITIVE, UNCERTAIN = 1, 3  # CheXbert classes: 0 blank, 1 positive, 2 negative, 3 uncertain
MAX_IDS = 512  # BERT's positions: CheXbert keeps [CLS], the first 510 tokens and [SEP]
# Saved by the transformers versions (3.x to 4.30) that made position_ids a persistent buffer; an arange that
# BertModel builds itself, so a checkpoint may carry it or not (the released one, saved with 2.x, does not).
REBUILT_BUFFERS = frozenset({"bert.embeddings.position_ids"})


class CheXbertLabeler(nn.Module):
    """CheXbert's ``bert_labeler`` at inference: BERT, then 13 four-class heads and one two-class head on [CLS]."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config)
        hidden = config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.bert(input_ids, attention_mask=attention_mask)[0][:, 0]
        return [head(cls) for head in self.linear_heads]


def check_paths(checkpoint: str | os.PathLike, bert: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the config key and the path of a missing checkpoint or BERT file."""
    wanted = [("score.clinical.chexbert.checkpoint", Path(checkpoint))]
    wanted += [("score.clinical.chexbert.bert", Path(bert) / name) for name in ("config.json", "vocab.txt")]
    for key, path in wanted:
        if not path.is_file():
            raise FileNotFoundError(f"CheXbert: {key}: {path} does not exist (weights are never downloaded: put the "
                                    "CheXbert checkpoint and a local bert-base-uncased folder there)")  # fmt: skip


def load_chexbert(checkpoint: str | os.PathLike, bert: str | os.PathLike) -> tuple[CheXbertLabeler, object]:
    """The labeler with the checkpoint's weights (strict: a missing or extra tensor raises, naming it) and the
    tokenizer of the local BERT folder."""
    from a3tune.compat import ensure_torchvision

    ensure_torchvision()  # transformers' modeling code imports torchvision
    from transformers import BertConfig, BertTokenizer

    check_paths(checkpoint, bert)
    tokenizer = BertTokenizer.from_pretrained(str(bert), local_files_only=True)
    model = CheXbertLabeler(BertConfig.from_pretrained(str(bert), local_files_only=True))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(saved, Mapping) or "model_state_dict" not in saved:
        raise ValueError(f"CheXbert: {checkpoint} is not a CheXbert checkpoint (no 'model_state_dict')")
    state = {key.removeprefix("module."): value for key, value in saved["model_state_dict"].items()}
    state = {key: value for key, value in state.items() if key not in REBUILT_BUFFERS}
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"CheXbert: {checkpoint} does not match the labeler built from {bert}/config.json: "
                         f"missing {missing[:8]}{' …' if len(missing) > 8 else ''} ({len(missing)}), "
                         f"unexpected {extra[:8]}{' …' if len(extra) > 8 else ''} ({len(extra)})")  # fmt: skip
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # a shape that differs from config.json's
        raise ValueError(f"CheXbert: {checkpoint}: {error}") from None
    return model.eval(), tokenizer


def encode_report(text: str, tokenizer) -> list[int]:
    """CheXbert's input ids of one report: whitespace collapsed, [CLS] + WordPiece ids (cut to fit) + [SEP]."""
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" ".join(text.split())))
    return [tokenizer.cls_token_id, *ids[: MAX_IDS - 2], tokenizer.sep_token_id]


@torch.no_grad()
def label_reports(model: CheXbertLabeler, tokenizer, reports: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """CheXbert classes of each report, (n, 14) int64 in :data:`CONDITIONS` order (padded batches, masked)."""
    rows = []
    for start in range(0, len(reports), batch_size):
        encoded = [torch.tensor(encode_report(text, tokenizer)) for text in reports[start : start + batch_size]]
        ids = nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(encoded):
            mask[i, : len(row)] = 1
        rows.append(torch.stack([logits.argmax(dim=1) for logits in model(ids, mask)], dim=1))
    return torch.cat(rows).numpy() if rows else np.zeros((0, len(CONDITIONS)), np.int64)


def positive_labels(classes: np.ndarray, *, uncertain_positive: bool = True) -> np.ndarray:
    """Binary labels of CheXbert classes: positive, and uncertain too unless ``uncertain_positive`` is False."""
    classes = np.asarray(classes)
    return (classes == POSITIVE) | (uncertain_positive & (classes == UNCERTAIN))


def label_f1(references: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of the positive labels, (n, k) binary arrays, as scikit-learn's multilabel
    ``classification_report``: ``precision``, ``recall``, ``f1`` (micro) and ``f1_macro`` (undefined ratios are 0)."""
    refs, hyps = np.asarray(references, bool), np.asarray(predictions, bool)
    tp, fp, fn = (refs & hyps).sum(0), (~refs & hyps).sum(0), (refs & ~hyps).sum(0)

    def ratio(num, den):
        return np.divide(num, den, out=np.zeros(np.shape(num)), where=np.asarray(den) > 0)

    per_label = ratio(2 * tp, 2 * tp + fp + fn)
    tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
    return {"precision": float(ratio(tp, tp + fp)), "recall": float(ratio(tp, tp + fn)),
            "f1": float(ratio(2 * tp, 2 * tp + fp + fn)), "f1_macro": float(per_label.mean())}  # fmt: skip


def chexbert_scores(reference_classes: np.ndarray, predicted_classes: np.ndarray, *,
                    uncertain_positive: bool = True) -> dict[str, float]:  # fmt: skip
    """The metric's keys from CheXbert classes of references and predictions: ``<score>_14`` over every
    observation and ``<score>_5`` over :data:`TOP5` (score: precision, recall, f1 micro, f1_macro)."""
    refs = positive_labels(reference_classes, uncertain_positive=uncertain_positive)
    hyps = positive_labels(predicted_classes, uncertain_positive=uncertain_positive)
    top5 = [CONDITIONS.index(name) for name in TOP5]
    out = {f"{key}_14": value for key, value in label_f1(refs, hyps).items()}
    return out | {f"{key}_5": value for key, value in label_f1(refs[:, top5], hyps[:, top5]).items()}


def chexbert_metric(
    checkpoint: str | os.PathLike, bert: str | os.PathLike, *, uncertain_positive: bool = True, batch_size: int = 16
) -> Callable[[list[str], list[list[str]]], dict[str, float]]:
    """A clinical metric for :func:`a3tune.score.report_metrics.register_clinical_metric`.

    The paths are checked now (a missing one raises, naming it); the model is loaded on the first call. Each
    sample's first reference is labelled (CheXbert compares one report with one report).
    """
    check_paths(checkpoint, bert)
    loaded: list[tuple[CheXbertLabeler, object]] = []

    def metric(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if not loaded:
            loaded.append(load_chexbert(checkpoint, bert))
        model, tokenizer = loaded[0]
        refs = label_reports(model, tokenizer, [r[0].strip() for r in references], batch_size)
        hyps = label_reports(model, tokenizer, [p.strip() for p in predictions], batch_size)
        return chexbert_scores(refs, hyps, uncertain_positive=uncertain_positive)

    return metric
