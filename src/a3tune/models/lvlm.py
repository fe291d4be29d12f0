"""Loading and building LLaVA-family Med-LVLMs, with the image geometry the rest of a3tune needs.

Every model is a ``transformers.LlavaForConditionalGeneration`` with its ``LlavaProcessor``:
llava-hf checkpoints and LLaVA-Med converted by ``a3tune convert_model`` load from a local
directory (``load_lvlm``, which refuses anything it would load partly at random); the demo and
the tests build one in-process: ``build_tiny_llava`` here (random weights everywhere, a
word-level tokenizer built from a corpus; seconds to build), and ``a3tune.models.smollm2``
(trained SmolLM2-135M weights behind a random vision tower).
``a3tune.models.registry`` picks one from a config entry.

``LoadedLvlm`` carries what the labels and the probe must agree on with the model: the vision
grid G, the input side P and the image preprocessing (``pad`` or ``crop``, see
``a3tune.labels.grid``), all read from the model's config and processor, never assumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from a3tune.compat import ensure_torchvision
from a3tune.io.atomic import atomic_dir

ensure_torchvision()  # the processors' image backends import torchvision

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402

from a3tune.models.load_checks import check_llava_config, check_loading_info, weights_listing  # noqa: E402
from a3tune.models.word_tokenizer import IMAGE, build_word_tokenizer  # noqa: E402

PREPROCESSES = ("pad", "crop")
AttnImplementation = str | dict[str, str]

# LLaVA v1.5's conversation format ("USER: <image>\n{question} ASSISTANT: {answer}</s>"), written for
# list content (an image part, then text parts) as LlavaProcessor passes it.
LLAVA_V15_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% else %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

@dataclasses.dataclass(frozen=True, eq=False)
class LoadedLvlm:
    """A LLaVA model, its processor and the image geometry read from them."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor  # .tokenizer and .image_processor
    image_token_id: int
    n_image_tokens: int  # tokens one image becomes in the sequence (G*G)
    grid: int  # G: vision tokens per side
    input_size: int  # P: side of the model's square input in pixels
    preprocess: str  # "pad" (LLaVA v1.5) or "crop" (CLIP's resize + centre crop, LLaVA-Med v1)
    source: str  # checkpoint directory, or "tiny:<seed>" / "smollm2"

    def save(self, path: str | os.PathLike) -> None:
        """Write model (safetensors) and processor to ``path`` atomically; ``load_lvlm`` reads it back."""
        with atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)


def _geometry(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> dict[str, Any]:
    """Grid, token count, input side and preprocessing, from the model config and image processor."""
    config = model.config
    vision = config.vision_config
    if vision.image_size % vision.patch_size:
        raise ValueError(
            f"vision tower: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
        )
    grid = vision.image_size // vision.patch_size
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported: "
            "a3tune needs the image tokens to be exactly the G×G patch grid ('default' drops CLS)"
        )
    image_processor = processor.image_processor
    if getattr(image_processor, "do_pad", False):
        preprocess = "pad"
    elif getattr(image_processor, "do_center_crop", False):
        preprocess = "crop"
    else:
        raise ValueError(
            f"image processor {type(image_processor).__name__} neither pads to a square (do_pad) nor centre-crops "
            f"(do_center_crop); supported preprocesses: {list(PREPROCESSES)}"
        )
    if getattr(image_processor, "do_center_crop", False):
        input_size = image_processor.crop_size["height"]
    else:
        size = image_processor.size
        input_size = size.get("shortest_edge") or size["height"]
    if input_size != vision.image_size:
        raise ValueError(
            f"image processor makes {input_size}px inputs but the vision tower takes {vision.image_size}px"
        )
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    return {
        "image_token_id": int(image_token_id),
        "n_image_tokens": grid * grid,
        "grid": grid,
        "input_size": input_size,
        "preprocess": preprocess,
    }


def wrap_lvlm(model: LlavaForConditionalGeneration, processor: LlavaProcessor, source: str) -> LoadedLvlm:
    model.eval()
    return LoadedLvlm(model=model, processor=processor, source=source, **_geometry(model, processor))


def load_lvlm(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: AttnImplementation = "sdpa",
) -> LoadedLvlm:
    """Load an HF Llava checkpoint (llava-hf, or LLaVA-Med converted by ``a3tune convert_model``) from a
    local directory; a folder in another layout, or whose tensors do not all fit the model, raises
    ``ValueError`` instead of loading partly at random (``a3tune.models.load_checks``).

    Args:
        path: directory with ``config.json``, safetensors weights and the processor files; nothing is downloaded.
        dtype: parameter dtype.
        device: where the weights are loaded to.
        attn_implementation: a name (``"sdpa"``, ``"eager"``, a registered function) or the dict
            form ``{"text_config": name, "vision_config": "sdpa", "": "sdpa"}`` that gives the
            language model its own attention function.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LVLM checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LVLM checkpoint has no config.json: {path / 'config.json'}")
    check_llava_config(path)
    weights_listing(path)  # no safetensors: fail before the processor and the model are read
    processor = _load_processor(path)
    # ignore_mismatched_sizes: a wrong-shape tensor then lands in the loading report, which
    # check_loading_info turns into an error naming its file and key (transformers' own error names neither)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        device_map={"": device},
        local_files_only=True,
        use_safetensors=True,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    check_loading_info(path, model, info)
    return wrap_lvlm(model, processor, str(path))


def _load_processor(path: Path) -> LlavaProcessor:
    """The folder's processor, with the PIL image backend (see ``image_processor_for``) and a chat template."""
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: cannot load the processor ({str(exc).splitlines()[0]}); an HF Llava folder holds "
            "processor_config.json (or preprocessor_config.json), tokenizer.json and tokenizer_config.json"
        ) from exc
    if not isinstance(processor, LlavaProcessor):
        raise ValueError(f"{path}: expected a LlavaProcessor, found {type(processor).__name__}")
    if processor.chat_template is None:
        raise ValueError(f"{path}: the processor has no chat template (chat_template.jinja)")
    return processor


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's generator for a block without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_vision_config(
    *, image_size: int = 112, patch_size: int = 14, hidden: int = 32, layers: int = 2, heads: int = 2
) -> CLIPVisionConfig:
    """A small CLIP vision tower config (LLaVA reads the penultimate layer, so ``layers`` >= 2)."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )


def image_processor_for(
    preprocess: str,
    input_size: int,
    *,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    resample: int = PILImageResampling.BICUBIC,
) -> LlavaImageProcessorPil | CLIPImageProcessorPil:
    """An image processor with the given geometry (and CLIP's mean/std and bicubic resize by
    default), on the PIL backend.

    ``pad``: LLaVA v1.5's pad to a centred square filled with the mean colour, then resize to P
    (``LlavaImageProcessorPil(do_pad=True)``; the centre crop after it is a no-op). ``crop``: resize
    the shortest side to P, centre crop P×P (``CLIPImageProcessorPil``). The PIL classes reproduce
    the reference's preprocessing (``expand2square``, then CLIP's PIL bicubic resize) exactly, where
    the torchvision backend's resize differs; ``load_lvlm`` reads saved processors with the same
    backend, so a model built here and the same model reloaded see identical pixels.
    """
    if preprocess not in PREPROCESSES:
        raise ValueError(f"preprocess {preprocess!r} is not one of {list(PREPROCESSES)}")
    settings = {"size": {"shortest_edge": input_size}, "crop_size": {"height": input_size, "width": input_size},
                "image_mean": list(image_mean), "image_std": list(image_std), "resample": resample,
                "do_center_crop": True}  # fmt: skip
    if preprocess == "pad":
        return LlavaImageProcessorPil(do_pad=True, **settings)
    return CLIPImageProcessorPil(**settings)


def compose_llava(
    text_config: LlamaConfig,
    vision_config: CLIPVisionConfig,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    preprocess: str,
    chat_template: str,
    seed: int,
    attn_implementation: AttnImplementation,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised (seeded) LLaVA model and its processor."""
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    with _seeded(seed):
        model = LlavaForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    processor = LlavaProcessor(
        image_processor=image_processor_for(preprocess, vision_config.image_size),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # CLIP's CLS, which the "default" strategy drops again
    )
    return model, processor


def build_tiny_llava(
    *,
    corpus: Iterable[str],
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    rope_theta: float = 10000.0,
    preprocess: str = "pad",
    seed: int = 0,
    attn_implementation: AttnImplementation = "sdpa",
) -> LoadedLvlm:
    """A random-weight LLaVA (tiny CLIP tower, projector, Llama with GQA) built in-process.

    Args:
        corpus: texts whose words (plus those of the chat template) make the word-level vocabulary.
        image_size, patch_size: P and the patch side; G = P / patch.
        vision_hidden, vision_layers, vision_heads: the CLIP tower.
        text_hidden, text_layers, text_heads, kv_heads, intermediate, rope_theta: the Llama model;
            grouped-query attention when ``kv_heads < text_heads``.
        preprocess: ``pad`` or ``crop``.
        seed: the weights are a function of the seed (and the other arguments) only.
        attn_implementation: as for ``load_lvlm``.
    """
    tokenizer = build_word_tokenizer([*corpus, "user assistant system :"])
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rope_theta=rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision_config = tiny_vision_config(
        image_size=image_size, patch_size=patch_size, hidden=vision_hidden, layers=vision_layers, heads=vision_heads
    )
    model, processor = compose_llava(
        text_config,
        vision_config,
        tokenizer,
        preprocess=preprocess,
        chat_template=LLAVA_V15_TEMPLATE,
        seed=seed,
        attn_implementation=attn_implementation,
    )
    return wrap_lvlm(model, processor, f"tiny:{seed}")
