"""convert_tokenizer and the chat templates against the reference's own tokenization.

The reference side is written out here from LLaVA-Med's rules, independently of the code under
test: ``Conversation.get_prompt`` (SeparatorStyle.TWO for vicuna_v1, LLAMA_2 for mistral_instruct),
transformers' slow ``LlamaTokenizer(legacy=True)`` (special and added tokens split out, each piece
between them encoded by sentencepiece on its own) and ``mm_utils.tokenizer_image_token``. Our side is
the converted fast tokenizer in a processor, through ``encode_batch``, on a real sentencepiece model.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from a3tune.models.convert.tokenizer import CHAT_MODES, chat_template, convert_tokenizer
from a3tune.models.layout import IGNORE_INDEX, encode_batch
from a3tune.models.lvlm import image_processor_for, tiny_vision_config, wrap_lvlm
from tests.fixtures_spm import LLAVA_V1_TOKENS, write_spm_tokenizer

V = 400  # sentencepiece pieces
FORMATS = {  # the layout of each checkpoint family, as the converter passes it
    "v1.5": {"v1_tokens": False, "image_token": "<image>", "image_block": "<image>"},
    "v1": {"v1_tokens": True, "image_token": "<im_patch>", "image_block": "<im_start><im_patch><im_end>"},
}
QUESTION, ANSWER = "What abnormality is seen in the left lung?", "A nodule,  5 mm (ü)."
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Format -> (original tokenizer folder, its length)."""
    root = tmp_path_factory.mktemp("spm")
    return {name: (root / name, write_spm_tokenizer(root / name, llava_v1_tokens=f["v1_tokens"]))
            for name, f in FORMATS.items()}  # fmt: skip


@pytest.fixture(scope="module")
def converted(folders):
    """Format -> (converted tokenizer, image token id)."""
    return {name: convert_tokenizer(folder, vocab_size=vocab, image_token=FORMATS[name]["image_token"])
            for name, (folder, vocab) in folders.items()}  # fmt: skip


def _reference_prompt(mode: str, image_block: str, question: str, answer: str | None) -> str:
    """Conversation.get_prompt of one turn, the user message being image block + "\\n" + question."""
    messages = [("USER", image_block + "\n" + question), ("ASSISTANT", answer)]
    if mode == "vicuna_v1":  # SeparatorStyle.TWO, sep " ", sep2 "</s>"
        ret = SYSTEM + " "
        for i, (role, message) in enumerate(messages):
            ret += f"{role}: {message.strip()}{' ' if i % 2 == 0 else '</s> '}" if message else f"{role}:"
        return ret.strip()
    ret = ""  # SeparatorStyle.LLAMA_2, sep "", sep2 "</s>", empty system
    for i, (_, message) in enumerate(messages):
        if message:
            ret += f"[INST] {message} [/INST]" if i % 2 == 0 else f" {message} </s>"
    return ret


def _slow_tokenize(sp, specials: dict[str, int], text: str, strip: frozenset[str] = frozenset()) -> list[int]:
    """The slow LlamaTokenizer(legacy=True): bos, then specials split out, the rest by sentencepiece.

    ``strip``: tokens added as plain strings, around which transformers 4.28 (LLaVA-Med v1's) strips
    the whitespace of both neighbouring pieces.
    """
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    for i, piece in enumerate(pieces):
        if piece in strip:
            pieces[i - 1] = pieces[i - 1].rstrip() if i > 0 else ""
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
    ids = [sp.bos_id()]
    for piece in pieces:
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


def _tokenizer_image_token(sp, specials, prompt: str, image_token: str, image_id: int, n: int) -> list[int]:
    """mm_utils.tokenizer_image_token, the image's index repeated for its n features: each chunk
    around the image token tokenized on its own, the bos of every chunk but the first dropped."""
    chunks = [_slow_tokenize(sp, specials, chunk) for chunk in prompt.split(image_token)]
    ids = chunks[0][:1]
    for k, chunk in enumerate(chunks):
        ids += [image_id] * n * (k > 0) + chunk[1:]
    return ids


def _lvlm(tokenizer, image_token: str, template: str):
    """A LoadedLvlm for the tokenizer (16 image tokens); its weights on the meta device, never run."""
    vision = tiny_vision_config(image_size=56)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(image_token),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)  # fmt: skip
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(image_processor=image_processor_for("pad", 56), tokenizer=tokenizer,
                               chat_template=template, image_token=image_token, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    return wrap_lvlm(model, processor, "test")


def _image():
    return np.zeros((40, 56, 3), np.uint8)


@pytest.mark.parametrize("mode", CHAT_MODES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_training_sample_tokenizes_as_the_reference(folders, converted, fmt, mode):
    import sentencepiece

    folder, _ = folders[fmt]
    tokenizer, image_id = converted[fmt]
    layout = FORMATS[fmt]
    lvlm = _lvlm(tokenizer, layout["image_token"], chat_template(mode, layout["image_block"]))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    added = json.loads((folder / "added_tokens.json").read_text()) if (folder / "added_tokens.json").is_file() else {}
    specials |= added
    for answer in (ANSWER, None):
        batch = encode_batch(lvlm, [_image()], [QUESTION], None if answer is None else [answer])
        ours = batch.inputs["input_ids"][0].tolist()
        prompt = _reference_prompt(mode, layout["image_block"], QUESTION, answer)
        if fmt == "v1":  # model_vqa_med / train.py: the patches written into the text, one tokenizer call
            expanded = prompt.replace(layout["image_token"], layout["image_token"] * lvlm.n_image_tokens)
            theirs = _slow_tokenize(sp, specials, expanded, strip=frozenset(added))
        else:
            theirs = _tokenizer_image_token(sp, specials, prompt, layout["image_token"], image_id, lvlm.n_image_tokens)
        assert ours == theirs, (fmt, mode, answer, tokenizer.convert_ids_to_tokens(ours))
        assert (batch.image_index[0] == torch.tensor(np.flatnonzero(np.array(theirs) == image_id))).all()


@pytest.mark.parametrize("mode", CHAT_MODES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_answers_end_of_sequence_is_labelled(converted, fmt, mode):
    tokenizer, _ = converted[fmt]
    layout = FORMATS[fmt]
    lvlm = _lvlm(tokenizer, layout["image_token"], chat_template(mode, layout["image_block"]))
    batch = encode_batch(lvlm, [_image()], [QUESTION], [ANSWER])
    ids, labels = batch.inputs["input_ids"][0], batch.labels[0]
    start, end = batch.answer_span[0].tolist()
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    # the whole assistant turn through </s>, the last token of the sample; mistral's " </s>" puts a "▁" before it
    assert labelled == list(range(start, len(ids))) and int(ids[-1]) == tokenizer.eos_token_id
    between = tokenizer.convert_ids_to_tokens(ids[end:-1].tolist())
    assert between == ([] if mode == "vicuna_v1" else ["▁"])
    assert torch.equal(labels[labelled], ids[labelled])


def test_image_token_and_added_tokens(folders, converted):
    tokenizer, image_id = converted["v1.5"]
    assert image_id == V and len(tokenizer) == V + 1 and tokenizer.convert_ids_to_tokens(V) == "<image>"
    assert tokenizer.pad_token == "<unk>"
    tokenizer, image_id = converted["v1"]
    added = json.loads((folders["v1"][0] / "added_tokens.json").read_text())
    assert list(added) == list(LLAVA_V1_TOKENS)
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in added} == added
    assert image_id == added["<im_patch>"] and len(tokenizer) == V + 4 and "<image>" not in tokenizer.get_vocab()
    assert tokenizer.pad_token == "[PAD]"  # the folder names one


def test_v1_special_tokens_come_from_the_sentencepiece_model(converted):
    # the v1 folder's special_tokens_map says "</s>" for bos, eos and unk, its tokenizer_config ""
    tokenizer, _ = converted["v1"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer("lung").input_ids[0] == 1 and tokenizer("lung").input_ids[-1] != 2


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_saved_tokenizer_keeps_the_legacy_prefix(converted, tmp_path, fmt):
    tokenizer, _ = converted[fmt]
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = f"USER: {FORMATS[fmt]['image_token']}\nWhat is it? ASSISTANT: A lung </s>"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert (reloaded.pad_token, reloaded.bos_token, len(reloaded)) == (tokenizer.pad_token, "<s>", len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
    after_image = tokens[tokens.index(FORMATS[fmt]["image_token"]) + 1]
    # v1.5: the legacy "▁" before the newline; v1: whitespace stripped around the token, as transformers 4.28 did
    assert after_image == ("▁" if fmt == "v1.5" else "▁What")


def test_wrong_vocab_size_raises(folders):
    folder, vocab = folders["v1.5"]
    with pytest.raises(ValueError, match=f"has {vocab} tokens .* {vocab + 1} rows"):
        convert_tokenizer(folder, vocab_size=vocab + 1, image_token="<image>")


def test_added_token_with_another_id_raises(folders, tmp_path):
    folder, vocab = folders["v1"]
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[PAD]": V, "<im_patch>": V + 2}))
    with pytest.raises(ValueError, match="'<im_patch>' should have id 402"):
        convert_tokenizer(tmp_path, vocab_size=vocab, image_token="<im_patch>")


def test_missing_tokenizer_model_raises(folders, tmp_path):
    (tmp_path / "tokenizer_config.json").write_bytes((folders["v1.5"][0] / "tokenizer_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        convert_tokenizer(tmp_path, vocab_size=V, image_token="<image>")


def test_missing_sentencepiece_raises(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match="needs sentencepiece and protobuf"):
        convert_tokenizer(folders["v1.5"][0], vocab_size=V, image_token="<image>")


def test_unknown_chat_mode_names_the_known_ones():
    with pytest.raises(ValueError, match="vicuna_v1.*mistral_instruct"):
        chat_template("llava_v0", "<image>")
