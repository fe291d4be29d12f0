"""Image-token geometry from the tokenized sequence: two templates, padded batches on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from a3tune.models.layout import IGNORE_INDEX, encode_batch, render_prompt
from a3tune.models.lvlm import build_tiny_llava

# LLaVA v1 ("### Human: ... ### Assistant: ...") and ChatML, both closing the answer with eos.
LLAVA_V1 = (
    "{% for m in messages %}{{ '### ' + ('Human' if m['role'] == 'user' else 'Assistant') + ': ' }}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"llava_v1": LLAVA_V1, "chatml": CHATML}

QUESTIONS = ["What is in the image?", "Is there a mass in the left lung near the heart?", "Organ?"]
ANSWERS = ["A lesion.", "yes", "the liver, with a cyst"]
CORPUS = [*QUESTIONS, *ANSWERS, "### human assistant im_start user <|>", "image"]


@pytest.fixture(scope="module")
def lvlm():
    return build_tiny_llava(corpus=CORPUS, seed=3)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 20 * i, 70, 3), dtype=np.uint8) for i in range(3)]


def _words(lvlm, text: str) -> str:
    tokenizer = lvlm.processor.tokenizer
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_spans_and_logits_match_single_samples(lvlm, images, template, padding_side, one_thread):
    batch = encode_batch(lvlm, images, QUESTIONS, ANSWERS, template=TEMPLATES[template], padding_side=padding_side)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    tokenizer = lvlm.processor.tokenizer
    n = ids.shape[1]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # really padded
    with torch.no_grad():
        logits = lvlm.model(**batch.inputs).logits
    for i in range(3):
        real = torch.arange(n)[mask[i]]
        assert real.tolist() == list(range(real[0], real[0] + lengths[i]))  # pads only on one side
        assert (real[0] == 0) if padding_side == "right" else (real[-1] == n - 1)
        # Question and answer spans decode back to their words.
        start, end = batch.question_span[i].tolist()
        assert tokenizer.decode(ids[i, start:end]) == _words(lvlm, QUESTIONS[i])
        start, end = batch.answer_span[i].tolist()
        assert tokenizer.decode(ids[i, start:end]) == _words(lvlm, ANSWERS[i])
        # Labels: exactly the answer and the eos that ends the turn.
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten().tolist()
        assert labelled == list(range(start, end + 1))
        assert ids[i, end] == tokenizer.eos_token_id
        assert torch.equal(batch.labels[i, start : end + 1], ids[i, start : end + 1])
        # Image tokens: all of them, in order; post-image rows: every real position after them.
        image_at = torch.nonzero(ids[i] == lvlm.image_token_id).flatten()
        assert torch.equal(batch.image_index[i], image_at) and image_at.numel() == lvlm.n_image_tokens
        assert torch.equal(batch.post_image[i], mask[i] & (torch.arange(n) > image_at[-1]))
        # The sample alone gives the same logits as in the padded batch.
        one = slice(i, i + 1)
        alone = encode_batch(lvlm, images[one], QUESTIONS[one], ANSWERS[one], template=TEMPLATES[template])
        assert torch.equal(alone.inputs["input_ids"][0], ids[i, mask[i]])
        with torch.no_grad():
            single = lvlm.model(**alone.inputs).logits[0]
        torch.testing.assert_close(logits[i, mask[i]], single, atol=1e-5, rtol=0)


def test_input_ids_equal_the_processors(lvlm, images):
    """Expanding the image token ourselves gives what LlavaProcessor gives for the rendered prompt."""
    batch = encode_batch(lvlm, images[:1], QUESTIONS[:1], ANSWERS[:1])
    text = render_prompt(lvlm.processor, QUESTIONS[0], ANSWERS[0])
    reference = lvlm.processor(images=images[:1], text=[text], return_tensors="pt")
    assert torch.equal(batch.inputs["input_ids"], reference["input_ids"])
    torch.testing.assert_close(batch.inputs["pixel_values"], reference["pixel_values"])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_generation_prompt_has_empty_answer_span(lvlm, images, padding_side):
    batch = encode_batch(lvlm, images, QUESTIONS, padding_side=padding_side)
    assert batch.labels is None
    mask = batch.inputs["attention_mask"].bool()
    last_real = torch.stack([torch.nonzero(row).max() for row in mask])
    assert torch.equal(batch.answer_span[:, 0], last_real + 1)
    assert torch.equal(batch.answer_span[:, 1], last_real + 1)
    assert render_prompt(lvlm.processor, "x", None).endswith("ASSISTANT:")


def test_bad_templates_and_batches_raise(lvlm, images):
    trims = CHATML.replace("{{ part['text'] }}", "{{ part['text'] | trim }}")
    with pytest.raises(ValueError, match="alters the question"):
        encode_batch(lvlm, images[:1], [" padded question "], template=trims)
    two_images = CHATML.replace("'<image>'", "'<image><image>'")
    with pytest.raises(ValueError, match="2 image tokens"):
        encode_batch(lvlm, images[:1], QUESTIONS[:1], template=two_images)
    with pytest.raises(ValueError, match="batch sizes differ"):
        encode_batch(lvlm, images[:2], QUESTIONS)
