"""A real sentencepiece tokenizer in the original LLaMA / Mistral folder layout, trained in-process.

LLaVA-Med ships ``tokenizer.model`` with tokenizer_config.json and special_tokens_map.json and no
tokenizer.json; the converter must turn that into a fast tokenizer that tokenizes as the original
code did, so the tests need a genuine sentencepiece model with LLaMA's normalizer settings (BPE,
byte fallback, dummy prefix, no whitespace folding, <unk>/<s>/</s> at 0/1/2), not a stand-in.
Training takes about a second, so the model is trained once per process and only written per folder.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

# Medical VQA-like sentences: enough text for a few hundred BPE merges beyond the 256 byte pieces.
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is shown in this image? ASSISTANT: A chest x-ray with a nodule in the left lung.",
    "Is there a fracture of the femur? No, the bone is intact.",
    "Which organ is enlarged in the abdomen? The liver appears enlarged.",
    "What abnormality is seen in the right upper lobe? A consolidation consistent with pneumonia.",
    "Where is the lesion located? The lesion is located in the temporal lobe of the brain.",
    "Does the scan show a pleural effusion? Yes, there is a small effusion on the right side.",
    "What modality was used to acquire this image? This is a computed tomography scan.",
    "Is the heart size normal? The cardiac silhouette is within normal limits.",
    "What does the histology slide show? Glandular tissue with atypical cells and mitoses.",
    "Are there signs of hemorrhage? There is an acute hemorrhage in the left basal ganglia.",
    "How many kidneys are visible? Both kidneys are visible and normal in size.",
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "The mass has irregular margins and heterogeneous enhancement after contrast.",
    "[INST] What is the plane of this image? [/INST] The image is in the axial plane.",
    "The patient presents with cough, fever and shortness of breath for three days.",
    "Magnetic resonance imaging reveals a hyperintense signal in the white matter.",
    "An ultrasound of the gallbladder shows multiple stones without wall thickening.",
    "Pathology: infiltrating ductal carcinoma of the breast, grade two.",
    "The trachea is midline and the mediastinum is not widened.",
    "There is no pneumothorax, and the costophrenic angles are sharp.",
    "Answer the question using a single word or phrase.",
    "Yes. No. Left. Right. Lung. Liver. Brain. Kidney. Heart. Spleen.",
]

# LLaVA v0 / LLaVA-Med v1 deltas extend LLaMA's vocabulary by these four, in this order.
LLAVA_V1_TOKENS = ("[PAD]", "<im_patch>", "<im_start>", "<im_end>")


@functools.cache
def spm_model(vocab_size: int = 400) -> bytes:
    """A serialized BPE sentencepiece model with LLaMA's settings (``vocab_size`` counts the 3
    specials and 256 byte pieces, so it must exceed 259 plus the corpus's distinct characters)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}  # fmt: skip


def write_spm_tokenizer(folder: Path, *, llava_v1_tokens: bool = False, vocab_size: int = 400) -> int:
    """Write tokenizer.model, tokenizer_config.json and special_tokens_map.json into ``folder`` and
    return the tokenizer's length (the embedding rows a matching checkpoint has).

    Default: the Mistral / LLaVA-Med v1.5 layout (added_tokens_decoder for <unk>, <s>, </s>).
    ``llava_v1_tokens``: a LLaVA-Med v1 delta as its era wrote it: empty bos/eos/unk strings in
    tokenizer_config.json, "</s>" for all three in special_tokens_map.json with pad "[PAD]", and
    added_tokens.json with ``LLAVA_V1_TOKENS`` at ids ``vocab_size``..``vocab_size + 3``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(spm_model(vocab_size))
    if llava_v1_tokens:
        config = {"bos_token": "", "eos_token": "", "unk_token": "", "model_max_length": 2048,
                  "padding_side": "right", "tokenizer_class": "LlamaTokenizer"}  # fmt: skip
        specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}
        added = {token: vocab_size + i for i, token in enumerate(LLAVA_V1_TOKENS)}
        (folder / "added_tokens.json").write_text(json.dumps(added))
    else:
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "pad_token": None, "legacy": True, "model_max_length": 32768,
                  "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer",
                  "added_tokens_decoder": {str(i): _special(t) for i, t in enumerate(("<unk>", "<s>", "</s>"))}}  # fmt: skip
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        added = {}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return vocab_size + len(added)
