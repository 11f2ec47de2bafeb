"""Convert Hugging Face ``transformers`` CLIP checkpoints into open_clip's :class:`open_clip.model.CLIP`.

A HF CLIP folder holds ``config.json`` (``model_type == "clip"``), ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``), tokenizer files and usually
``preprocessor_config.json``. :func:`convert_hf_clip` maps the config, the weights, the preprocessing and the
tokenizer onto open_clip's conventions, so one model class serves both kinds of checkpoint. Nothing is imported
from ``transformers``: the config is read as JSON with the ``transformers`` defaults filled in.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file

from .checkpoint import read_state_dict
from .errors import CheckpointError

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for keys a config.json may omit.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_PROJECTION_DIM_DEFAULT = 512

# HF's legacy text pooling (argmax of the ids) applies when the config says eos_token_id == 2.
_LEGACY_EOS_TOKEN_ID = 2
_INTERPOLATIONS = {2: "bilinear", 3: "bicubic"}  # PIL resample codes used by CLIPImageProcessor
# Non-persistent buffers that older transformers versions saved into checkpoints.
_IGNORED_HF_KEYS = frozenset({"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"})

# open_clip key -> HF key, copied unchanged.
_RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# open_clip stores projections as [width, embed_dim] parameters (x @ proj); HF as nn.Linear weights [embed_dim, width].
_TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
# Per transformer block: open_clip name -> HF name, for both .weight and .bias.
_BLOCK_RENAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

Tensors = list[torch.Tensor]
# open_clip key -> (the HF keys it is built from, how to build it from those tensors)
_Plan = dict[str, tuple[tuple[str, ...], Callable[[Tensors], torch.Tensor]]]


class ConversionError(CheckpointError):
    """A Hugging Face CLIP folder cannot be converted faithfully (unknown or missing weights, unsupported config,
    unsafe pickle)."""


@dataclass
class ConvertedCheckpoint:
    """A HF CLIP checkpoint in open_clip terms.

    ``model_cfg``: kwargs for ``open_clip.model.CLIP(**model_cfg)``.
    ``preprocess_cfg``: ``{"size", "mean", "std", "interpolation", "resize_mode"}``.
    ``state_dict``: open_clip key names; loads into ``CLIP(**model_cfg)`` with ``strict=True``.
    ``tokenizer``: ``{"type": "open_clip", "context_length"}`` for the standard OpenAI BPE vocab, else
    ``{"type": "hf", "path", "context_length"}``.
    """

    model_cfg: dict
    preprocess_cfg: dict
    state_dict: dict[str, torch.Tensor]
    tokenizer: dict


def is_hf_clip_folder(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder whose ``config.json`` says ``"model_type": "clip"``."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "clip"


def convert_hf_clip(folder: str | os.PathLike) -> ConvertedCheckpoint:
    """Read a HF CLIP folder and convert it for open_clip's CLIP. Raises :class:`ConversionError`."""
    folder = Path(folder)
    if not is_hf_clip_folder(folder):
        raise ConversionError(f"{folder} is not a Hugging Face CLIP folder (needs config.json with model_type 'clip')")
    config = _read_json(folder / "config.json")
    text, vision = _sub_config(config, "text", _TEXT_DEFAULTS), _sub_config(config, "vision", _VISION_DEFAULTS)
    model_cfg = _model_cfg(text, vision, config.get("projection_dim", _PROJECTION_DIM_DEFAULT))

    plan = _conversion_plan(vision["num_hidden_layers"], text["num_hidden_layers"])
    state_dict = _apply_plan(plan, _load_weights(folder))
    _check_against_model(state_dict, model_cfg)

    return ConvertedCheckpoint(
        model_cfg=model_cfg,
        preprocess_cfg=_preprocess_cfg(folder, vision["image_size"]),
        state_dict=state_dict,
        tokenizer=_tokenizer_cfg(folder, text["vocab_size"], text["max_position_embeddings"]),
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def _sub_config(config: dict, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    # Old configs carry a legacy `<name>_config_dict`; transformers lets it win over `<name>_config`.
    sub = config.get(f"{name}_config_dict") or config.get(f"{name}_config") or {}
    return {**defaults, **sub}


def _model_cfg(text: dict[str, Any], vision: dict[str, Any], embed_dim: int) -> dict:
    """HF text/vision sub-configs -> kwargs for ``open_clip.model.CLIP``."""
    acts = {text["hidden_act"], vision["hidden_act"]}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise ConversionError(
            f"unsupported hidden_act (text {text['hidden_act']!r}, vision {vision['hidden_act']!r}): open_clip's CLIP "
            "needs both towers to use 'quick_gelu' or both 'gelu'"
        )
    if vision["num_channels"] != 3:
        raise ConversionError(f"open_clip's CLIP takes 3-channel images, the config has {vision['num_channels']}")
    for name, sub in (("text", text), ("vision", vision)):
        if sub["hidden_size"] % sub["num_attention_heads"]:
            raise ConversionError(f"{name} hidden_size is not a multiple of num_attention_heads")
    eos_token_id = text["eos_token_id"]
    if not isinstance(eos_token_id, int):
        raise ConversionError(f"text eos_token_id must be a single int, got {eos_token_id!r}")
    # Pool where HF pools: argmax of the ids for legacy configs, else the first eos token. That is the same
    # position for any ids, whether padded with 0 (open_clip's tokenizer) or with the eos token (HF's).
    if eos_token_id == _LEGACY_EOS_TOKEN_ID:
        pool = {"pool_type": "argmax"}
    else:
        pool = {"pool_type": "eos", "eos_id": eos_token_id}

    vision_cfg = {
        "width": vision["hidden_size"],
        "layers": vision["num_hidden_layers"],
        # open_clip derives the vision head count as width // head_width
        "head_width": vision["hidden_size"] // vision["num_attention_heads"],
        "mlp_ratio": _mlp_ratio(vision),
        "patch_size": vision["patch_size"],
        "image_size": vision["image_size"],
        "norm_kwargs": {"eps": vision["layer_norm_eps"]},
    }
    text_cfg = {
        "context_length": text["max_position_embeddings"],
        "vocab_size": text["vocab_size"],
        "width": text["hidden_size"],
        "heads": text["num_attention_heads"],
        "layers": text["num_hidden_layers"],
        "mlp_ratio": _mlp_ratio(text),
        "norm_kwargs": {"eps": text["layer_norm_eps"]},
        **pool,
    }
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "quick_gelu": acts == {"quick_gelu"},
    }


def _mlp_ratio(sub: dict[str, Any]) -> float:
    width, hidden = sub["hidden_size"], sub["intermediate_size"]
    ratio = hidden / width
    if int(width * ratio) != hidden:  # open_clip builds the MLP as int(width * mlp_ratio)
        raise ConversionError(f"intermediate_size {hidden} is not representable as width {width} * mlp_ratio")
    return ratio


def _take(tensors: Tensors) -> torch.Tensor:
    return tensors[0]


def _transpose(tensors: Tensors) -> torch.Tensor:
    return tensors[0].t().contiguous()


def _concat(tensors: Tensors) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _conversion_plan(vision_layers: int, text_layers: int) -> _Plan:
    """Every open_clip key of a CLIP with these depths, with the HF keys it comes from."""
    plan: _Plan = {oc: ((hf,), _take) for oc, hf in _RENAMES.items()}
    plan.update({oc: ((hf,), _transpose) for oc, hf in _TRANSPOSED.items()})
    towers = [
        ("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers),
        ("transformer.resblocks", "text_model.encoder.layers", text_layers),
    ]
    for oc_prefix, hf_prefix, layers in towers:
        for i in range(layers):
            oc, hf = f"{oc_prefix}.{i}", f"{hf_prefix}.{i}"
            for kind in ("weight", "bias"):
                # nn.MultiheadAttention packs q, k, v (in that order) into in_proj_*: [3 * width, ...]
                qkv = tuple(f"{hf}.self_attn.{p}_proj.{kind}" for p in "qkv")
                plan[f"{oc}.attn.in_proj_{kind}"] = (qkv, _concat)
                for oc_name, hf_name in _BLOCK_RENAMES.items():
                    plan[f"{oc}.{oc_name}.{kind}"] = ((f"{hf}.{hf_name}.{kind}",), _take)
    return plan


def _apply_plan(plan: _Plan, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    needed = {hf for hf_keys, _ in plan.values() for hf in hf_keys}
    present = set(hf_state) - _IGNORED_HF_KEYS
    missing, unexpected = sorted(needed - present), sorted(present - needed)
    if missing or unexpected:
        raise ConversionError(
            "HF CLIP weights do not match the config: "
            + "; ".join(
                f"{label}: {', '.join(keys)}"
                for label, keys in (("missing", missing), ("unexpected (unmapped)", unexpected))
                if keys
            )
        )
    return {oc: build([hf_state[hf] for hf in hf_keys]) for oc, (hf_keys, build) in plan.items()}


def _check_against_model(state_dict: dict[str, torch.Tensor], model_cfg: dict) -> None:
    """Compare keys and shapes with ``CLIP(**model_cfg)``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIP(**model_cfg).state_dict().items()}
    problems = [f"open_clip key not produced: {k}" for k in sorted(set(expected) - set(state_dict))]
    problems += [f"no open_clip key for: {k}" for k in sorted(set(state_dict) - set(expected))]
    problems += [
        f"{k}: weights {tuple(state_dict[k].shape)} vs config {tuple(shape)}"
        for k, shape in expected.items()
        if k in state_dict and state_dict[k].shape != shape
    ]
    if problems:
        raise ConversionError("converted weights do not fit open_clip's CLIP: " + "; ".join(problems))


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Load ``model.safetensors`` (single or sharded) or, failing that, ``pytorch_model.bin`` (tensors only)."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            state.update(load_file(folder / shard))
        return state
    bin_path = folder / "pytorch_model.bin"
    if not bin_path.is_file():
        raise ConversionError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {folder}")
    return read_state_dict(bin_path)


def _preprocess_cfg(folder: Path, image_size: int | list[int]) -> dict:
    """open_clip-style preprocessing from the HF image processor config, or CLIP defaults without one."""
    if (folder / "preprocessor_config.json").is_file():
        proc = _read_json(folder / "preprocessor_config.json")
    elif (folder / "processor_config.json").is_file():
        # transformers >= 5 saves a processor's image settings nested in processor_config.json
        proc = _read_json(folder / "processor_config.json").get("image_processor", {})
    else:
        proc = {}
    resample = proc.get("resample", 3)
    if resample not in _INTERPOLATIONS:
        raise ConversionError(f"unsupported resample {resample!r} (supported: 2 = bilinear, 3 = bicubic)")
    return {
        "size": _square_size(proc.get("crop_size") or proc.get("size") or image_size),
        "mean": tuple(proc.get("image_mean", OPENAI_DATASET_MEAN)),
        "std": tuple(proc.get("image_std", OPENAI_DATASET_STD)),
        "interpolation": _INTERPOLATIONS[resample],
        "resize_mode": "shortest",
    }


def _square_size(size: Any) -> int:
    """HF sizes ({"height", "width"}, {"shortest_edge"}, [h, w] or int) -> one int side."""
    if isinstance(size, dict):
        size = size["shortest_edge"] if "shortest_edge" in size else [size.get("height"), size.get("width")]
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    if not isinstance(size, int):
        raise ConversionError(f"unsupported image size {size!r}: core_clip preprocessing needs a square crop")
    return size


def _tokenizer_cfg(folder: Path, vocab_size: int, context_length: int) -> dict:
    if vocab_size == 49408 and _has_openai_bpe(folder):
        return {"type": "open_clip", "context_length": context_length}
    return {"type": "hf", "path": str(folder), "context_length": context_length}


def _has_openai_bpe(folder: Path) -> bool:
    """True if ``vocab.json`` + ``merges.txt`` are exactly the BPE that open_clip's SimpleTokenizer uses."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        return False
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError):
        return False
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]

    reference = SimpleTokenizer(context_length=None)
    # Same ids; only the special tokens are spelled differently (<start_of_text> vs <|startoftext|>).
    expected = {tok: i for tok, i in reference.encoder.items() if i not in reference.all_special_ids}
    expected |= {"<|startoftext|>": reference.sot_token_id, "<|endoftext|>": reference.eot_token_id}
    return vocab == expected and merges == list(reference.bpe_ranks)
