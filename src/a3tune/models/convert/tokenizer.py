"""The reference's prompts and tokenizer, for converted LLaVA-Med checkpoints.

Two pieces the checkpoint's weights were trained against and that an HF Llava folder must carry:

- ``chat_template``: the reference's conversation modes (``llava/conversation.py``) as jinja
  templates in the format ``a3tune.models.layout`` renders (list content: the image part, then the
  text; one image token that the processor expands to the image's n tokens). The image block is a
  parameter because the versions differ: v1.5 writes ``<image>``, v1 ``<im_start><im_patch><im_end>``,
  each followed by a newline before the question. The templates never render the bos token: the
  tokenizer adds it, as the reference's ``tokenizer(prompt)`` / ``tokenizer_image_token`` did.
- ``convert_tokenizer``: the folder's sentencepiece ``tokenizer.model`` as a fast tokenizer that
  tokenizes as the reference did, checked against sentencepiece itself.

Only ``convert_tokenizer`` imports transformers and sentencepiece, so the CLI can read ``CHAT_MODES``
without loading either.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("a3tune")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# A message's text: string content as is; list content part by part, the image as its block and a
# newline (the reference's DEFAULT_IMAGE_TOKEN + "\n" + question). The block is a jinja string
# literal (json escapes are jinja escapes), so trim_blocks cannot eat its newline.
_CONTENT_MACRO = (
    "{%- macro content(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ IMAGE_BLOCK }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

_BODIES = {
    # conv_vicuna_v1, SeparatorStyle.TWO (sep " ", sep2 "</s>"): system + sep, then per message
    # "ROLE: " + message.strip() + (sep | sep2 + " "), an open "ROLE:" for the pending reply, and the
    # whole stripped. Rendered: "{system} USER: <image>\n{q} ASSISTANT: {a}</s>" / "... ASSISTANT:".
    "vicuna_v1": (
        VICUNA_SYSTEM + "{%- for message in messages %}"
        " {{ message['role'] | upper }}: {{ content(message) | trim }}"
        "{%- if message['role'] == 'assistant' %}</s>{% endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %} ASSISTANT:{% endif -%}"
    ),
    # conv_mistral_instruct, SeparatorStyle.LLAMA_2 (sep "", sep2 "</s>", empty system, so no <<SYS>>):
    # user "[INST] {m} [/INST]", assistant " {m} </s>", nothing for the pending reply; no stripping.
    "mistral_instruct": (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}[INST] {{ content(message) }} [/INST]"
        "{%- else %} {{ content(message) }} </s>{%- endif -%}"
        "{%- endfor -%}"
    ),
}
CHAT_MODES = tuple(_BODIES)  # ("vicuna_v1", "mistral_instruct")


def chat_template(mode: str, image_block: str) -> str:
    """The jinja chat template of the reference's conversation ``mode`` (one of ``CHAT_MODES``),
    rendering an image part as ``image_block`` followed by a newline."""
    if mode not in _BODIES:
        raise ValueError(f"unknown chat template mode {mode!r}; known: {list(CHAT_MODES)}")
    macro = _CONTENT_MACRO.replace("IMAGE_BLOCK", json.dumps(image_block + "\n"))
    return macro + _BODIES[mode]


# Text for checking the fast tokenizer against sentencepiece: start of text, a space before and a
# newline after a special token, a double space, digits and a byte-fallback character.
_PROBE = ("What is seen? ", "\n 5 mm,  left lung: ü")


def _load_sentencepiece(model_file: Path):
    try:
        import google.protobuf  # noqa: F401  (transformers reads the model's proto with it)
        import sentencepiece
    except ImportError as exc:
        raise ImportError(
            f"converting {model_file} needs sentencepiece and protobuf (pip install 'sentencepiece>=0.2' 'protobuf>=4'): {exc}"
        ) from exc
    return sentencepiece.SentencePieceProcessor(model_file=str(model_file))


def convert_tokenizer(source_dir: str | Path, *, vocab_size: int, image_token: str) -> tuple[PreTrainedTokenizerBase, int]:
    """Load an original folder's sentencepiece tokenizer as a fast tokenizer; return it and the id
    of ``image_token``.

    Why ``legacy=True``: the reference tokenizes the text on either side of ``<image>`` separately
    (``tokenizer_image_token``), so each piece gets sentencepiece's dummy prefix "▁"; tokenizing the
    prompt in one pass reproduces that after a special token only with the legacy ("always")
    pre-tokenizer. It is written into ``init_kwargs`` so that ``save_pretrained`` records it:
    without it in tokenizer_config.json, a reloaded tokenizer drops the "▁" again.

    bos / eos / unk come from the sentencepiece model, not the folder's configs (LLaVA-Med v1
    copies say "</s>" or "" for all three); bos is added, eos not, as LLaMA's tokenizer does. Pad
    becomes unk when the folder names none, as the reference's v1 training sets it.

    Args:
        source_dir: folder with ``tokenizer.model`` and the configs beside it (tokenizer_config.json,
            special_tokens_map.json, added_tokens.json); a tokenizer.json is not needed.
        vocab_size: the checkpoint's embedding rows, which the tokenizer's length must equal.
        image_token: the token the processor expands to the image's n tokens; added as a special
            token (id ``vocab_size``: the embeddings grow by one row) when the vocabulary lacks it.
    """
    source = Path(source_dir)
    model_file = source / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"no sentencepiece model at {model_file}; the original checkpoint folder has one")
    sp = _load_sentencepiece(model_file)
    from transformers import AddedToken, AutoTokenizer

    specials = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                         ("unk_token", sp.unk_id())) if i >= 0}  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(
        source, local_files_only=True, legacy=True, add_bos_token=True, add_eos_token=False, **specials
    )
    tokenizer.init_kwargs["legacy"] = True
    added_file = source / "added_tokens.json"
    added = json.loads(added_file.read_text()) if added_file.is_file() else {}
    for token, want in added.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise ValueError(f"{added_file}: {token!r} should have id {want}, the tokenizer gives it {got}")
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's embeddings have "
            f"{vocab_size} rows (vocab_size); tokenizer and weights do not belong together"
        )
    _check_against_sentencepiece(tokenizer, sp, model_file)
    # The v1 era (transformers 4.28) added these as plain strings, and its slow tokenizer stripped the
    # whitespace on both sides of such tokens: "USER: <im_start>" and "<im_end>\nWhat" lost their
    # space and newline. The same flags on the fast tokenizer give the same ids.
    if added:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False, lstrip=True, rstrip=True)
                              for token in added], special_tokens=True)  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        log.info("convert_model: added %s to the tokenizer as id %d", image_token, vocab_size)
    return tokenizer, tokenizer.convert_tokens_to_ids(image_token)


def _check_against_sentencepiece(tokenizer: PreTrainedTokenizerBase, sp, model_file: Path) -> None:
    """Raise unless the fast tokenizer gives sentencepiece's own ids for a probe text, bos included
    and with a special token in the middle (each side encoded on its own, as the reference did)."""
    before, after = _PROBE
    text = before + tokenizer.eos_token + after
    want = [sp.bos_id(), *sp.encode(before), sp.eos_id(), *sp.encode(after)]
    got = tokenizer(text).input_ids
    if got != want:
        raise ValueError(f"{model_file}: the converted tokenizer disagrees with sentencepiece on {text!r}: {got} != {want}")
