"""Answer generation: greedy and beam search against hand loops, batching, stop strings, A³MoE routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from a3tune.models.lvlm import build_tiny_llava
from a3tune.score.generation import DecodeSettings, cut_at_stop, generate_answers, generate_ids, load_scored_model, prompt_batch
from a3tune.tune.adapter_config import AdapterConfig
from a3tune.tune.adapters import apply_adapters, save_adapter
from a3tune.tune.moe import routing

CORPUS = ["is there a lesion in the liver", "yes no", "which organ is bright", "the spleen ### kidney"]
QUESTIONS = ["is there a lesion in the liver", "which organ is bright", "is the spleen bright"]
GREEDY = DecodeSettings(num_beams=1, max_new_tokens=5)


def _tiny(seed: int = 0):
    return build_tiny_llava(corpus=CORPUS, image_size=56, text_hidden=32, text_layers=2, text_heads=4, kv_heads=2, seed=seed)


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _argmax_loop(lvlm, image, question: str, steps: int) -> list[int]:
    """Greedy decoding by hand: a full forward (no cache) per token, argmax of the last logits."""
    batch = prompt_batch(lvlm, [image], [question])
    ids, eos = batch.inputs["input_ids"], lvlm.processor.tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = lvlm.model(input_ids=ids, pixel_values=batch.inputs["pixel_values"]).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def _sequence_logprob(lvlm, image, question: str, tokens: list[int]) -> float:
    """Teacher-forced log-probability of ``tokens`` after the prompt."""
    batch = prompt_batch(lvlm, [image], [question])
    ids = torch.cat([batch.inputs["input_ids"], torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logits = lvlm.model(input_ids=ids, pixel_values=batch.inputs["pixel_values"]).logits[0].log_softmax(-1)
    start = batch.inputs["input_ids"].shape[1]
    return sum(float(logits[start - 1 + i, t]) for i, t in enumerate(tokens))


def _trim(ids: torch.Tensor, eos: int, pad: int) -> list[int]:
    """Generated ids up to and including the first eos, padding removed."""
    out = []
    for token in ids.tolist():
        if token == pad and token != eos:
            break
        out.append(token)
        if token == eos:
            break
    return out


def test_greedy_equals_a_hand_argmax_loop(tiny, one_thread):
    image = _images(1)[0]
    ids = generate_ids(tiny, prompt_batch(tiny, [image], [QUESTIONS[0]]), GREEDY)
    tokenizer = tiny.processor.tokenizer
    assert _trim(ids[0], tokenizer.eos_token_id, tokenizer.pad_token_id) == _argmax_loop(tiny, image, QUESTIONS[0], 5)


def test_left_padded_batch_equals_one_by_one(tiny, one_thread):
    images = _images(3)
    batched = generate_answers(tiny, images, QUESTIONS, GREEDY)
    single = [generate_answers(tiny, [im], [q], GREEDY)[0] for im, q in zip(images, QUESTIONS, strict=True)]
    assert batched == single
    assert any(batched)  # the random model does say something


def test_beam_search_scores_at_least_greedy(tiny, one_thread):
    image, question = _images(1)[0], QUESTIONS[1]
    tokenizer = tiny.processor.tokenizer
    batch = prompt_batch(tiny, [image], [question])
    trim = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    greedy = _trim(generate_ids(tiny, batch, DecodeSettings(num_beams=1, max_new_tokens=4))[0], *trim)
    beam = _trim(generate_ids(tiny, batch, DecodeSettings(num_beams=5, max_new_tokens=4))[0], *trim)
    assert len(beam) == len(greedy) == 4  # no early end: the scores compare sums over the same length
    assert _sequence_logprob(tiny, image, question, beam) >= _sequence_logprob(tiny, image, question, greedy) - 1e-5


def test_stop_strings_cut_the_answer(tiny, one_thread):
    assert cut_at_stop("the spleen ### kidney", ("###",)) == "the spleen "
    assert cut_at_stop("a b", ("###", "b")) == "a "
    assert cut_at_stop("no stop", ("###",)) == "no stop"
    images = _images(3)
    long = generate_answers(tiny, images, QUESTIONS, DecodeSettings(num_beams=1, max_new_tokens=8))
    words = [answer.split() for answer in long]
    # Stop at each answer's second word: the answer keeps only its first word.
    stop = tuple({w[1] for w in words if len(w) > 1 and w[1] != w[0]})
    cut = generate_answers(tiny, images, QUESTIONS, DecodeSettings(num_beams=1, max_new_tokens=8, stop=stop))
    assert stop and cut == [cut_at_stop(answer, stop).strip() for answer in long]
    assert all(len(c.split()) < len(w) for c, w in zip(cut, words, strict=True) if len(w) > 1 and w[1] in stop)


def test_moe_adapter_greedy_uses_the_prefill_routing(one_thread, tmp_path):
    lvlm = _tiny(seed=1)
    config = AdapterConfig(base_model="t", qk="moe")
    apply_adapters(lvlm.model, config)
    with torch.no_grad():
        for name, parameter in lvlm.model.named_parameters():
            if "lora_B" in name or "router" in name:
                parameter.normal_(std=0.5)
    lvlm.model.eval()
    image, question = _images(1)[0], QUESTIONS[0]
    batch = prompt_batch(lvlm, [image], [question])
    ids = generate_ids(lvlm, batch, GREEDY)
    with routing(batch.question_span, batch.image_index):
        expected = _argmax_loop(lvlm, image, question, 5)
    tokenizer = lvlm.processor.tokenizer
    assert _trim(ids[0], tokenizer.eos_token_id, tokenizer.pad_token_id) == expected

    # The same adapter saved and loaded onto a fresh base by load_scored_model answers the same.
    save_adapter(lvlm.model, config, tmp_path / "adapter")
    loaded = load_scored_model({"builder": "tiny", "corpus": CORPUS, "image_size": 56, "text_hidden": 32, "seed": 1},
                               str(tmp_path / "adapter"))  # fmt: skip
    assert generate_answers(loaded, [image], [question], GREEDY) == generate_answers(lvlm, [image], [question], GREEDY)


def test_decoding_length_by_task():
    from a3tune.score.generation import MAX_NEW_TOKENS

    assert DecodeSettings().for_tasks(["report", "vqa"]).max_new_tokens == MAX_NEW_TOKENS["report"] == 1024
    assert DecodeSettings().for_tasks(["vqa"]).max_new_tokens == MAX_NEW_TOKENS["vqa"]
    assert DecodeSettings(max_new_tokens=7).for_tasks(["report"]).max_new_tokens == 7
