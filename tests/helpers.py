"""Test helpers: random Hugging Face CLIP checkpoints with real OpenAI-BPE tokenizer files, built offline, and a
recorder of the ops that would sync a GPU."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from torch.utils._python_dispatch import TorchDispatchMode

# Small enough for fast tests, with distinct widths per tower and several heads. It uses exact GELU and the
# current special token ids (eos 49407: HF pools at the first eos), ViT-B-32 the other variants of both.
_TINY = {
    "projection_dim": 32,
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "gelu",
    },
}
# openai/clip-vit-base-patch32, including its legacy special token ids (eos 2 -> HF pools at argmax of the ids).
_VIT_B_32 = {
    "projection_dim": 512,
    "text_config": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
    },
}
ARCHS = {"tiny": _TINY, "ViT-B-32": _VIT_B_32}


def save_random_hf_clip(folder: str | os.PathLike, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised ``transformers.CLIPModel`` plus tokenizer and preprocessor files to ``folder``.

    Loads offline with ``CLIPModel.from_pretrained(folder)`` and ``CLIPProcessor.from_pretrained(folder)``.
    Deterministic for a given ``seed``. Returns the folder.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(**ARCHS[arch])

    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0; perturb every 1-D parameter so that a swapped or
    # dropped LayerNorm / bias / q-k-v slice changes the outputs.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)

    vocab, merges = _openai_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
    )
    context_length = config.text_config.max_position_embeddings
    CLIPTokenizer.from_pretrained(folder, model_max_length=context_length).save_pretrained(folder)

    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def _openai_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The HF spelling of open_clip's SimpleTokenizer vocabulary: (token -> id, merges in rank order).

    Ids: 256 byte characters, the same with '</w>', one token per merge, then <|startoftext|> = 49406 and
    <|endoftext|> = 49407.
    """
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # same slice as SimpleTokenizer
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def torchmetrics_clip(folder: str | os.PathLike):
    """``(model, processor)`` from a HF CLIP folder, for ``CLIPScore(model_name_or_path=lambda: ...)``.

    torchmetrics 1.9 uses ``get_image_features()`` / ``get_text_features()`` as tensors; transformers 5 returns
    output objects holding the projected features in ``pooler_output``. The model is wrapped to hand torchmetrics
    that tensor; weights and processing are untouched.
    """
    from transformers import CLIPModel, CLIPProcessor

    class _TensorFeatures(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            return pooled_features(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return pooled_features(super().get_text_features(*args, **kwargs))

    return _TensorFeatures.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def pooled_features(out) -> torch.Tensor:
    """The projected features from ``get_*_features``: a tensor (transformers 4) or ``.pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HostSyncs(TorchDispatchMode):
    """Records the ops that make a GPU's host wait for all queued work: reading tensor values back (``.item()``,
    ``float(t)`` and ``bool(t)`` are ``_local_scalar_dense``; ``nonzero``, ``equal``, ``masked_select``, ``unique``)
    and making a tensor from host data (``torch.tensor(list)``, ``new_tensor``: ``lift_fresh``, which a GPU receives
    by a blocking copy). ``sites`` lists, per op, (file name, function) of the innermost clipguide, core_clip or
    diffusers frame that asked for it (diffusers' schedulers read their timesteps back). Moves of existing tensors
    (``.to(device)``, ``.cpu()``, ``.tolist()``) are not seen: on the CPU they are no-ops."""

    OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2",
           "unique_consecutive", "unique_dim", "lift_fresh", "lift_fresh_copy"}
    PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("clipguide", "core_clip")) + (
        importlib.util.find_spec("diffusers").submodule_search_locations[0],)

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(self.PACKAGES):
                frame = frame.f_back
            self.sites.append((Path(frame.f_code.co_filename).name, frame.f_code.co_name) if frame else ("?", "?"))
        return func(*args, **(kwargs or {}))
