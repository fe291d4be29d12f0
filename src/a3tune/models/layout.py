"""Image-token geometry read from the tokenized sequence (DESIGN §4.3): no hard-coded offsets.

A prompt is the processor's chat template applied to a user turn (the image, then the question)
and, when answers are given, an assistant turn. Where the question and the answer lie in the text
is found by rendering the template once with unique placeholders; the image token is expanded to
the model's ``n_image_tokens`` copies (as ``LlavaProcessor`` does), the text is tokenized with
offsets, and each span is the set of tokens whose characters overlap it. Batches are padded by
hand on either side, with position ids that restart at 0 for every sample, so that a sample's
logits do not depend on its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch

if TYPE_CHECKING:
    from transformers import ProcessorMixin

    from a3tune.models.lvlm import LoadedLvlm

IGNORE_INDEX = -100
# Private-use characters stand in for the question and answer while locating them in the template.
_Q_MARK, _A_MARK = "\ue000", "\ue001"


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded batch and where its parts lie; all positions index the padded sequence."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids, pixel_values: model(**inputs)
    labels: torch.Tensor | None  # (B, N) CE targets: answer tokens (+ end-of-turn token), -100 elsewhere
    image_index: torch.Tensor  # (B, n_image_tokens) long: positions of the image tokens, row-major grid
    question_span: torch.Tensor  # (B, 2) long [start, end) of the question's tokens
    answer_span: torch.Tensor  # (B, 2) long [start, end) of the answer's tokens; [end, end) without one
    post_image: torch.Tensor  # (B, N) bool: real positions after the last image token (query rows R)


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos token; ValueError without either."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has no usable pad (or eos) token to pad the batch with")
    return int(pad_id)


def first_post_image_row(post_image: torch.Tensor) -> int:
    """The earliest post-image row any sample of the batch has (``Batch.post_image``, (B, N)): where
    a block of query rows that covers every sample's rows R can start. ValueError when no sample has one."""
    rows = post_image.any(dim=0).nonzero()
    if rows.numel() == 0:
        raise ValueError("no sample of the batch has tokens after its image")
    return int(rows[0, 0])


def _messages(question: str, answer: str | None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render_prompt(processor: ProcessorMixin, question: str, answer: str | None, template: str | None = None) -> str:
    """The chat prompt for one sample, with a single image token; a generation prompt when
    ``answer`` is None. ``template`` overrides the processor's chat template."""
    return processor.apply_chat_template(
        _messages(question, answer), chat_template=template, tokenize=False, add_generation_prompt=answer is None
    )


def _locate(
    processor: ProcessorMixin, question: str, answer: str | None, template: str | None
) -> tuple[str, tuple[int, int], tuple[int, int] | None]:
    """The rendered prompt and the character spans of the question and the answer in it."""
    skeleton = render_prompt(processor, _Q_MARK, None if answer is None else _A_MARK, template)
    for mark, what in ((_Q_MARK, "question"), (_A_MARK, "answer")):
        if (answer is not None or mark == _Q_MARK) and skeleton.count(mark) != 1:
            raise ValueError(f"chat template renders the {what} {skeleton.count(mark)} times; expected once")
    q_at = skeleton.index(_Q_MARK)
    a_at = skeleton.find(_A_MARK)
    text = skeleton.replace(_Q_MARK, question)
    if answer is not None:
        text = text.replace(_A_MARK, answer)
    if text != render_prompt(processor, question, answer, template):
        raise ValueError("chat template alters the question or answer text (e.g. trims it); cannot locate it")
    q_span = (q_at, q_at + len(question))
    if answer is None:
        return text, q_span, None
    if a_at < q_at:
        raise ValueError("chat template puts the answer before the question")
    a_at += len(question) - 1  # the question's placeholder was one character long
    return text, q_span, (a_at, a_at + len(answer))


def _expand_image(text: str, image_token: str, n: int, spans: list[tuple[int, int] | None]):
    """Replace the single image token by ``n`` copies, shifting the character spans after it."""
    if text.count(image_token) != 1:
        raise ValueError(f"prompt holds {text.count(image_token)} image tokens {image_token!r}; expected one")
    at = text.index(image_token)
    shift = (n - 1) * len(image_token)
    text = text[:at] + image_token * n + text[at + len(image_token) :]
    moved = [None if s is None else tuple(c + shift if c > at else c for c in s) for s in spans]
    return text, moved


def _token_span(offsets: np.ndarray, chars: tuple[int, int], what: str, index: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens whose characters overlap ``chars``."""
    start, end = chars
    hit = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0]))
    if hit.size == 0:
        raise ValueError(f"sample {index}: the {what} produced no tokens")
    return int(hit[0]), int(hit[-1]) + 1


def _turn_end(text: str, ids: np.ndarray, offsets: np.ndarray, answer_end: int, special: set[int]) -> int:
    """Where the labels end: after the special token that closes the turn when one follows the answer,
    whitespace-only tokens between included (LLaMA-2's " </s>" leaves a "▁" there, and the reference
    trains on the whole turn); else at the answer's end."""
    end = answer_end
    while end < len(ids) and text[offsets[end, 0] : offsets[end, 1]].isspace():
        end += 1
    return end + 1 if end < len(ids) and int(ids[end]) in special else answer_end


def _to_pil(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    return image.convert("RGB")


def encode_batch(
    lvlm: LoadedLvlm,
    images: Sequence[PIL.Image.Image | np.ndarray],
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    template: str | None = None,
    padding_side: str = "right",
) -> Batch:
    """Tokenize and pad a batch of (image, question[, answer]) samples and locate their parts.

    Labels cover the answer's tokens and, when the template ends the turn with a special token
    (``</s>``, ``<|im_end|>``), that token too, with any whitespace between (``mistral_instruct``'s
    " </s>"); they are None without answers.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(images) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise ValueError(
            f"batch sizes differ: {len(images)} images, {len(questions)} questions, "
            f"{'no' if answers is None else len(answers)} answers"
        )
    tokenizer = lvlm.processor.tokenizer
    pad_id = pad_token_id(tokenizer)
    if pad_id == lvlm.image_token_id:
        raise ValueError("tokenizer has no usable pad (or eos) token to pad the batch with: it is the image token")
    special = set(tokenizer.all_special_ids)
    image_token = lvlm.processor.image_token

    rows = []
    for i, question in enumerate(questions):
        answer = None if answers is None else answers[i]
        text, q_chars, a_chars = _locate(lvlm.processor, question, answer, template)
        text, (q_chars, a_chars) = _expand_image(text, image_token, lvlm.n_image_tokens, [q_chars, a_chars])
        add_special = tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token)
        encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        image_at = np.flatnonzero(ids == lvlm.image_token_id)
        if image_at.size != lvlm.n_image_tokens or image_at[-1] - image_at[0] + 1 != image_at.size:
            raise ValueError(
                f"sample {i}: expected {lvlm.n_image_tokens} contiguous image tokens, found {image_at.size} "
                f"spanning positions {image_at[:1].tolist()}..{image_at[-1:].tolist()}"
            )
        question_span = _token_span(offsets, q_chars, "question", i)
        if a_chars is None:
            answer_span, target_end = (len(ids), len(ids)), len(ids)
        else:
            answer_span = _token_span(offsets, a_chars, "answer", i)
            target_end = _turn_end(text, ids, offsets, answer_span[1], special)
        rows.append((ids, image_at, question_span, answer_span, target_end))

    # Pad by hand: every position below is shifted by the sample's left padding.
    n = max(len(ids) for ids, *_ in rows)
    size = (len(rows), n)
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(size, dtype=torch.long)
    position_ids = torch.zeros(size, dtype=torch.long)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
    post_image = torch.zeros(size, dtype=torch.bool)
    image_index, question_spans, answer_spans = [], [], []
    for b, (ids, image_at, question_span, answer_span, target_end) in enumerate(rows):
        shift = n - len(ids) if padding_side == "left" else 0
        real = slice(shift, shift + len(ids))
        input_ids[b, real] = torch.from_numpy(ids)
        attention_mask[b, real] = 1
        position_ids[b, real] = torch.arange(len(ids))
        post_image[b, shift + int(image_at[-1]) + 1 : shift + len(ids)] = True
        targets = slice(shift + answer_span[0], shift + target_end)
        labels[b, targets] = input_ids[b, targets]
        image_index.append(torch.from_numpy(image_at) + shift)
        question_spans.append([question_span[0] + shift, question_span[1] + shift])
        answer_spans.append([answer_span[0] + shift, answer_span[1] + shift])

    pixel_values = lvlm.processor.image_processor(images=[_to_pil(im) for im in images], return_tensors="pt")
    return Batch(
        inputs={
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "pixel_values": pixel_values["pixel_values"].to(lvlm.model.dtype),
        },
        labels=None if answers is None else labels,
        image_index=torch.stack(image_index),
        question_span=torch.tensor(question_spans, dtype=torch.long),
        answer_span=torch.tensor(answer_spans, dtype=torch.long),
        post_image=post_image,
    )
