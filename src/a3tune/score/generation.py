"""Answers from a scored model: the base Med-LVLM, optionally with a trained adapter (reference §9.2).

The reference decodes with beam search (5 beams, no sampling) and also runs greedy; generation
stops at a stop string ("###" for its prompt). Here a batch is encoded by
``a3tune.models.layout.encode_batch`` without answers and padded on the left, so every sample's
next token is read at the last column; ``model.generate`` extends the per-sample position ids
(they restart at 0 for every sample, as ``attention_mask.cumsum() - 1`` would give).

Every generate call runs inside ``a3tune.tune.moe.routing(batch.question_span, batch.image_index)``:
A³MoE layers route at the prefill (the question gates are cached there for the decode steps, and
beam search's repeated rows reuse them), plain models ignore it.

Stop strings are checked on the decoded text of the generated tokens after every step (a
``StoppingCriteria``, tokenizer-agnostic, unlike transformers' token-level ``stop_strings``, which
needs a BPE vocabulary), and the answer is cut before the first stop string.

Inference-time baselines plug in through ``logits_processors`` (see ``a3tune.score.baselines``):
an item is a ``LogitsProcessor``, or a factory ``batch -> LogitsProcessor`` called with the encoded
prompt batch (contrastive processors need the prompt's pixels and layout). A processor that is
also a context manager is entered around the generate call (PAI's attention amplification).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import torch

from a3tune.compat import ensure_torchvision

ensure_torchvision()  # importing transformers' generation code imports torchvision

from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList  # noqa: E402

from a3tune.models.layout import Batch, encode_batch, pad_token_id  # noqa: E402
from a3tune.models.lvlm import LoadedLvlm  # noqa: E402
from a3tune.models.registry import lvlm_from_config  # noqa: E402
from a3tune.tune.adapters import load_adapter  # noqa: E402
from a3tune.tune.moe import routing  # noqa: E402

ProcessorSpec = LogitsProcessor | Callable[[Batch], LogitsProcessor]


# Decoding length when the config sets none, by task: reports need hundreds of tokens (the reference allows 1024
# new tokens for every task); a VQA answer is a word or a phrase, and a short cap keeps a rambling model cheap.
MAX_NEW_TOKENS = {"vqa": 64, "report": 1024}


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How answers are decoded; the defaults are the reference's A³Tune setting (5 beams, no sampling).

    ``max_new_tokens`` None: per task, :data:`MAX_NEW_TOKENS` (see :meth:`for_tasks`).
    """

    num_beams: int = 5
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    do_sample: bool = False  # True: plain sampling at temperature 1 (no top-k / top-p)

    def __post_init__(self) -> None:
        if self.num_beams < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {self.num_beams}, {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    def for_tasks(self, tasks: Sequence[str]) -> DecodeSettings:
        """These settings with a decoding length: the configured one, else the longest default of ``tasks``."""
        if self.max_new_tokens is not None:
            return self
        return dataclasses.replace(self, max_new_tokens=max(MAX_NEW_TOKENS[t] for t in set(tasks) or {"vqa"}))


def load_scored_model(model_spec: dict, adapter_dir: str | None) -> LoadedLvlm:
    """The base model of a config entry (``registry.lvlm_from_config``), with the adapter at ``adapter_dir``
    applied and loaded when given; in eval mode (adapter dropout off)."""
    lvlm = lvlm_from_config(model_spec)
    if adapter_dir is not None:
        load_adapter(lvlm.model, adapter_dir)
    lvlm.model.eval()
    return lvlm


def prompt_batch(lvlm: LoadedLvlm, images: Sequence[PIL.Image.Image | np.ndarray], questions: Sequence[str]) -> Batch:
    """The generation prompts of a batch, left-padded so that every sample ends at the last column."""
    return encode_batch(lvlm, images, questions, None, padding_side="left")


def generate_answers(
    lvlm: LoadedLvlm,
    images: Sequence[PIL.Image.Image | np.ndarray],
    questions: Sequence[str],
    settings: DecodeSettings,
    *,
    logits_processors: Sequence[ProcessorSpec] | None = None,
) -> list[str]:
    """Decoded answers (special tokens skipped, cut at the first stop string, stripped), one per question."""
    batch = prompt_batch(lvlm, images, questions)
    generated = generate_ids(lvlm, batch, settings, logits_processors=logits_processors)
    texts = lvlm.processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [cut_at_stop(text, settings.stop).strip() for text in texts]


def generate_ids(
    lvlm: LoadedLvlm, batch: Batch, settings: DecodeSettings, *, logits_processors: Sequence[ProcessorSpec] | None = None
) -> torch.Tensor:
    """(B, T) generated token ids of a prompt batch (the prompt removed; pad after an early end)."""
    settings = settings.for_tasks(["vqa"])  # a caller that knows its tasks has resolved the length already
    tokenizer = lvlm.processor.tokenizer
    processors = [p if isinstance(p, LogitsProcessor) else p(batch) for p in logits_processors or ()]
    device = lvlm.model.device
    inputs = {name: value.to(device) for name, value in batch.inputs.items()}
    prompt_length = inputs["input_ids"].shape[1]
    stopping = StoppingCriteriaList([StopOnText(tokenizer, settings.stop, prompt_length)] if settings.stop else [])
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if settings.do_sample else {}
    pad_id = pad_token_id(tokenizer)
    with contextlib.ExitStack() as stack:
        for processor in processors:
            if isinstance(processor, contextlib.AbstractContextManager):
                stack.enter_context(processor)
        stack.enter_context(routing(batch.question_span.to(device), batch.image_index.to(device)))
        stack.enter_context(torch.no_grad())
        output = lvlm.model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            do_sample=settings.do_sample,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=stopping,
            **sampling,
        )
    return output[:, prompt_length:].cpu()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    ends = [text.find(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


class StopOnText(StoppingCriteria):
    """Done for a row once its decoded generated text contains one of the stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stop, self.prompt_length = tokenizer, tuple(stop), prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)
