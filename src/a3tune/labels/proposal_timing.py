"""Where a proposal call's time goes: ``time_model`` splits it into SAM's encoder, decoder and the rest.

A context manager of its own because it instruments the model (forward hooks, wrapped methods)
rather than generating anything; ``generate_proposals`` wraps each call in it and returns the
``Timings`` (``a3tune.labels.proposal_types``) with the proposals.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch

from a3tune.labels.proposal_types import Timings


@contextlib.contextmanager
def time_model(model: torch.nn.Module) -> Iterator[Timings]:
    """Time a block, and within it every forward pass of the model's encoder and decoder.

    Forward hooks on ``image_encoder`` count as encoder time, on ``prompt_encoder`` and
    ``mask_decoder`` as decoder time; on CUDA each hook synchronises so the times are real.
    ``Sam.preprocess`` (normalise and pad the encoder input) and ``Sam.postprocess_masks``
    (upscale the decoder's logits to the image) are the rest of ``Sam.forward``; they count as
    encoder and decoder time, timed by wrapping them on the instance for the block.
    The ``Timings`` are complete when the block exits.
    """
    timings = Timings()
    cuda = next(model.parameters()).device.type == "cuda"
    starts: dict[int, float] = {}

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def pre(module: torch.nn.Module, *_: Any) -> None:
        starts[id(module)] = now()

    def post(kind: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, *_: Any) -> None:
            elapsed = now() - starts.pop(id(module))
            setattr(timings, f"{kind}_s", getattr(timings, f"{kind}_s") + elapsed)
            if kind == "encoder" or module is model.mask_decoder:
                setattr(timings, f"{kind}_calls", getattr(timings, f"{kind}_calls") + 1)

        return hook

    def timed(kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            began = now()
            try:
                return method(*args, **kwargs)
            finally:
                setattr(timings, f"{kind}_s", getattr(timings, f"{kind}_s") + now() - began)

        return call

    parts = {"encoder": [model.image_encoder], "decoder": [model.prompt_encoder, model.mask_decoder]}
    handles = []
    for kind, modules in parts.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post(kind)))
    methods = {"preprocess": "encoder", "postprocess_masks": "decoder"}
    for name, kind in methods.items():
        setattr(model, name, timed(kind, getattr(model, name)))
    started = now()
    try:
        yield timings
    finally:
        timings.total_s = now() - started
        for handle in handles:
            handle.remove()
        for name in methods:
            delattr(model, name)  # the instance attribute; the class's method shows again
