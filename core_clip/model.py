"""Load CLIP models by name or path and serve L2-normalised embeddings.

``load(name)`` resolves, in order:

1. a local path: a folder in open_clip's hub layout (``open_clip_config.json`` + weights), a Hugging Face
   transformers CLIP folder (converted to open_clip's architecture), or a weights file (``.safetensors``,
   ``.pt``, ``.pth``, ``.bin``) with its config beside it (``<stem>.json``) or an ``arch=`` argument;
2. a model shipped in ``core_clip/weights/`` (``<name>.safetensors`` + ``<name>.json``);
3. a config in ``core_clip/model_configs/`` or an open_clip architecture name (random weights, with a warning);
4. ``hf-hub:org/repo`` and ``ARCH:TAG`` pretrained weights, from the local cache or downloaded; offline they
   fail fast with a message naming the file to fetch.

Every checkpoint loads strictly (all keys, all shapes) and without unpickling code.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import hub
from .checkpoint import load_strict, read_state_dict, save_json, save_safetensors
from .errors import CheckpointError, CoreClipError, ImageReadError, ModelNotFoundError
from .preprocess import Images, Preprocess, as_image_batch, open_image
from .tokenizer import build_tokenizer

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_FOLDER_WEIGHTS = (WEIGHTS_NAME, "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")
DEFAULT_MODEL = "shapes"  # the shipped ShapesWorld CLIP: what the CLI and guidance use offline
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}  # smooth stand-ins for an image tower's ReLUs


def autocast(precision: str, device: str | torch.device = "cpu") -> torch.autocast:
    """The autocast context of ``precision`` (a key of :data:`PRECISIONS`; fp32 disables it) on ``device``'s type."""
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module`` in eval mode (batch norms on their running statistics, no dropout), then give
    it back the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def is_clip_score(value: object) -> bool:
    """Whether ``value`` is a number in [0, 100] (not a bool, not NaN): the range of ``100 * max(cos, 0)``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 100


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model: open_clip's ``model_cfg`` and ``preprocess_cfg`` (the layout of
    open_clip's ``open_clip_config.json``), plus the tokenizer and, for built-in architectures, their name.

    ``match_score``: the CLIP score (``100 * cos``) that 99% of true image-caption pairs of the model's own data
    reach, recorded by ``core-clip calibrate``; None when uncalibrated. Guidance retries pictures scoring below it.

    ``image_activation``: a key of :data:`IMAGE_ACTIVATIONS` that replaces every ReLU of the image tower (a
    ResNet's), so that its input gradient, which guidance follows, is smooth; None keeps the architecture's own.
    """

    model_cfg: dict
    preprocess_cfg: dict
    tokenizer: dict = field(default_factory=lambda: {"type": "open_clip"})
    arch: str | None = None
    match_score: float | None = None
    image_activation: str | None = None

    @classmethod
    def from_json(cls, obj: dict, source: str) -> "ModelConfig":
        if "model_cfg" not in obj:
            raise CheckpointError(f"{source} has no 'model_cfg' entry")
        model_cfg = obj["model_cfg"]
        preprocess_cfg = dict(obj.get("preprocess_cfg") or {})
        preprocess_cfg.setdefault("size", model_cfg.get("vision_cfg", {}).get("image_size", 224))
        tokenizer = obj.get("tokenizer")
        if tokenizer is None:
            text_cfg = model_cfg.get("text_cfg", {})
            hf_name = text_cfg.get("hf_tokenizer_name")
            tokenizer = {"type": "hf", "path": hf_name} if hf_name else {"type": "open_clip"}
            tokenizer["context_length"] = text_cfg.get("context_length", 77)
        match_score = obj.get("match_score")
        if match_score is not None and not is_clip_score(match_score):
            raise CheckpointError(f"{source}: match_score must be a number in [0, 100], got {match_score!r}")
        activation = obj.get("image_activation")
        if activation is not None and activation not in IMAGE_ACTIVATIONS:
            raise CheckpointError(f"{source}: unknown image_activation {activation!r}; expected one of "
                                  f"{', '.join(IMAGE_ACTIVATIONS)}")
        return cls(model_cfg, preprocess_cfg, tokenizer, obj.get("arch"), match_score, activation)

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read model config {path}: {e}") from None
        return cls.from_json(obj, str(path))

    @classmethod
    def for_arch(cls, arch: str, pretrained_cfg: dict | None = None) -> "ModelConfig":
        model_cfg = copy.deepcopy(open_clip.get_model_config(arch))
        pretrained_cfg = pretrained_cfg or {}
        if "quick_gelu" in pretrained_cfg:
            model_cfg["quick_gelu"] = pretrained_cfg["quick_gelu"]
        preprocess_cfg = {
            "size": model_cfg["vision_cfg"].get("image_size", 224),
            "mean": list(pretrained_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": list(pretrained_cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            "interpolation": pretrained_cfg.get("interpolation", "bicubic"),
        }
        return cls(model_cfg, preprocess_cfg, {"type": "open_clip"}, arch)


def _build_open_clip(model_cfg: dict) -> nn.Module:
    """Instantiate an open_clip model from its config with no pretrained tower weights (nothing downloads)."""
    cfg = copy.deepcopy(model_cfg)
    vision_cfg, text_cfg = cfg["vision_cfg"], cfg["text_cfg"]
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "multimodal_cfg" in cfg:
        raise CoreClipError("CoCa models are not supported: core_clip serves contrastive dual encoders")
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def replace_image_activation(clip: nn.Module, activation: str) -> None:
    """Replace every ``nn.ReLU`` of ``clip.visual`` by a fresh ``IMAGE_ACTIVATIONS[activation]`` module, in place.
    The weights stay as they are (GELU and SiLU are close to ReLU away from 0, so a trained tower keeps most of what
    it knew). Raises CoreClipError for an unknown name or a tower without ReLUs (a ViT already uses GELU)."""
    if activation not in IMAGE_ACTIVATIONS:
        raise CoreClipError(f"unknown image activation {activation!r}; expected one of {', '.join(IMAGE_ACTIVATIONS)}")
    found = [(parent, name) for parent in clip.visual.modules()
             for name, child in parent.named_children() if isinstance(child, nn.ReLU)]
    if not found:
        raise CoreClipError(f"the image tower ({type(clip.visual).__name__}) has no ReLU to replace by {activation}")
    for parent, name in found:
        setattr(parent, name, IMAGE_ACTIVATIONS[activation]())


class ClipModel(nn.Module):
    """A CLIP dual encoder with its tokenizer and preprocessing.

    ``encode_image`` takes preprocessed pixels, ``embed_images`` takes any images (PIL, uint8, float in [0, 1]);
    ``encode_text`` takes strings or token ids. All return float32 L2-normalised embeddings [N, embed_dim]. Without
    ``grad=True`` they run in ``torch.no_grad`` in chunks of ``batch_size``; with it, in one differentiable pass.
    """

    def __init__(self, clip: nn.Module, config: ModelConfig, name: str):
        super().__init__()
        self.clip = clip
        self.config = config
        self.name = name
        self.tokenizer = build_tokenizer(config.tokenizer, config.arch)
        self.preprocess = Preprocess.from_config(config.preprocess_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    @property
    def match_score(self) -> float | None:
        """See :class:`ModelConfig`: the CLIP score most true pairs reach, or None when uncalibrated."""
        return self.config.match_score

    @property
    def embed_dim(self) -> int:
        return int(self.config.model_cfg["embed_dim"])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] on the model's device."""
        return self.tokenizer(texts).to(self.device)

    def _run(self, fn, inputs: torch.Tensor, grad: bool, batch_size: int) -> torch.Tensor:
        if grad:
            return fn(inputs)
        with torch.no_grad():
            return torch.cat([fn(chunk) for chunk in inputs.split(batch_size)])

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        return F.normalize(self.clip.encode_image(x).float(), dim=-1)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        if not (isinstance(clip, open_clip.CLIP) and clip.attn_mask is not None
                and clip.text_pool_type in ("argmax", "eos")):
            return F.normalize(clip.encode_text(tokens).float(), dim=-1)
        # With causal attention the pooled end-of-text position never attends to later positions, so running the
        # transformer only up to the last end token in the chunk gives open_clip's result for a fraction of the
        # compute (captions are ~10 tokens of a 77-token context).
        if clip.text_pool_type == "argmax":
            end = tokens.argmax(dim=-1)
        else:
            end = (tokens == clip.text_eos_id).int().argmax(dim=-1)
        n = int(end.max()) + 1
        x = clip.token_embedding(tokens[:, :n]) + clip.positional_embedding[:n]
        x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
        x = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), end]
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x.float(), dim=-1)

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: preprocessed pixels [B, 3, S, S] and token ids [B, L] -> (image features [B, D],
        text features [B, D], both float32 L2-normalised, and the logit scale exp(t)). Text runs only up to the last
        end token, which gives open_clip's features and gradients exactly for less compute."""
        return self._image_features(pixels), self._text_features(tokens), self.clip.logit_scale.exp()

    def encode_image(self, x: torch.Tensor, *, grad: bool = False, batch_size: int = 256) -> torch.Tensor:
        """Preprocessed images [B, 3, S, S] (S = ``image_size``, normalised) -> embeddings [B, D]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise CoreClipError(f"encode_image expects preprocessed images [B, 3, H, W], got {tuple(x.shape)}")
        return self._run(self._image_features, x, grad, batch_size)

    def embed_images(self, images: Images, *, grad: bool = False, batch_size: int = 256) -> torch.Tensor:
        """Any images (see :func:`core_clip.preprocess.as_image_batch`) -> embeddings [B, D]."""
        x = as_image_batch(images)
        return self._run(lambda chunk: self._image_features(self.preprocess(chunk)), x, grad, batch_size)

    def embed_files(self, paths: Sequence[str | os.PathLike], *, batch_size: int = 64,
                    skip_unreadable: bool = False, progress: bool = False) -> tuple[torch.Tensor, list[Path]]:
        """Embed image files of any sizes -> (embeddings [M, D], the M paths embedded).

        Each image is resized and cropped on its own, then embedded in batches. An unreadable file raises
        :class:`ImageReadError`, or with ``skip_unreadable`` is left out with a logged warning.
        """
        kept, chunks = [], []
        for start in tqdm(range(0, len(paths), batch_size), desc="embed", unit="batch", disable=not progress):
            pixels = []
            for path in paths[start : start + batch_size]:
                try:
                    pixels.append(self.preprocess.resize_crop(as_image_batch(open_image(path))))
                except ImageReadError as e:
                    if not skip_unreadable:
                        raise
                    log.warning("skipping %s", e)
                    continue
                kept.append(Path(path))
            if pixels:
                chunks.append(self.encode_image(self.preprocess.normalize(torch.cat(pixels))))
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)
        return embeddings, kept

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, *, grad: bool = False,
                    batch_size: int = 256) -> torch.Tensor:
        """Strings (or token ids [N, L]) -> embeddings [N, D]."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, torch.Tensor):
            if len(texts) == 0:
                raise CoreClipError("encode_text needs at least one text")
            texts = self.tokenize(list(texts))
        return self._run(self._text_features, texts.to(self.device), grad, batch_size)

    def save(self, path: str | os.PathLike) -> Path:
        """Save weights + config so that ``core_clip.load(path)`` rebuilds this model.

        ``path`` ending in ``.safetensors`` writes that file and ``<stem>.json`` beside it; any other path is a
        folder in open_clip's hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``). Both files
        are written atomically. Returns the path to pass to :func:`load`.
        """
        path = Path(path)
        config = {k: v for k, v in asdict(self.config).items()
                  if v is not None or k not in ("arch", "match_score", "image_activation")}
        if path.suffix == ".safetensors":
            weights, config_path = path, path.with_suffix(".json")
        else:
            weights, config_path = path / WEIGHTS_NAME, path / CONFIG_NAME
        save_safetensors(self.clip.state_dict(), weights)
        save_json(config, config_path)
        return path


@dataclass
class _Resolved:
    config: ModelConfig
    weights: Path | dict | None  # a file, an in-memory state dict (converted checkpoints), or None: random init
    config_file: Path | None = None  # the local json the config came from (shipped or user models), else None


def list_shipped() -> list[str]:
    """Names of the models shipped in ``core_clip/weights/``."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors") if p.with_suffix(".json").is_file())


def list_configs() -> list[str]:
    """Names of core_clip's own architecture configs (random init)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _resolve_folder(path: Path) -> _Resolved:
    from .hf_convert import convert_hf_clip, is_hf_clip_folder

    if is_hf_clip_folder(path):
        converted = convert_hf_clip(path)
        config = ModelConfig(converted.model_cfg, converted.preprocess_cfg, converted.tokenizer)
        return _Resolved(config, converted.state_dict)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{path} is neither an open_clip model folder (no {CONFIG_NAME}) "
                              "nor a transformers CLIP folder (config.json with model_type 'clip')")
    weights = next((path / n for n in _FOLDER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has {CONFIG_NAME} but no weights file (looked for {', '.join(_FOLDER_WEIGHTS)})")
    return _Resolved(ModelConfig.from_file(config_path), weights, config_path)


def _resolve_file(path: Path, arch: str | None) -> _Resolved:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    if arch is not None:
        return _Resolved(_arch_config(arch), path)
    for config_path in (path.with_suffix(".json"), path.parent / CONFIG_NAME):
        if config_path.is_file():
            return _Resolved(ModelConfig.from_file(config_path), path, config_path)
    raise CheckpointError(f"{path}: no config found; put {path.with_suffix('.json').name} beside it "
                          "or pass arch= (an open_clip architecture name)")


def _arch_config(arch: str, pretrained_cfg: dict | None = None) -> ModelConfig:
    if (CONFIG_DIR / f"{arch}.json").is_file():
        return ModelConfig.from_file(CONFIG_DIR / f"{arch}.json")
    cleaned = arch.replace("/", "-")
    if cleaned not in open_clip.list_models():
        raise _not_found(arch)
    return ModelConfig.for_arch(cleaned, pretrained_cfg)


def _resolve_tag(arch: str, tag: str) -> _Resolved:
    arch = arch.replace("/", "-")
    if arch not in open_clip.list_models():
        raise _not_found(arch)
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelNotFoundError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {', '.join(tags) or 'none'}")
    what = f"{arch}:{tag}"
    if pcfg.get("hf_hub"):
        repo_id, filename = os.path.split(pcfg["hf_hub"])
        names = [filename] if filename else [WEIGHTS_NAME, "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        weights = hub.fetch(repo_id, names, what)
    elif pcfg.get("url"):
        weights = hub.fetch_url(pcfg["url"], what)
    else:
        raise ModelNotFoundError(f"{what} names no download location")
    return _Resolved(ModelConfig.for_arch(arch, pcfg), weights)


def _resolve_hub(repo_id: str) -> _Resolved:
    what = f"hf-hub:{repo_id}"
    config = ModelConfig.from_file(hub.fetch(repo_id, [CONFIG_NAME], what))
    return _Resolved(config, hub.fetch(repo_id, [WEIGHTS_NAME, "open_clip_pytorch_model.bin"], what))


def _not_found(name: str) -> ModelNotFoundError:
    known = list_shipped() + list_configs() + open_clip.list_models()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelNotFoundError(
        f"unknown model {name!r}: not a path, a shipped model ({', '.join(list_shipped()) or 'none'}), a core_clip "
        f"config ({', '.join(list_configs())}), an open_clip architecture, ARCH:TAG or hf-hub:ORG/REPO{hint}")


def resolve(name: str, arch: str | None = None) -> _Resolved:
    """Map a model name or path to its config and weights location (see the module docstring for the order)."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _resolve_folder(path) if path.is_dir() else _resolve_file(path, arch)
    if name.startswith("hf-hub:"):
        return _resolve_hub(name[len("hf-hub:"):])
    if name in list_shipped():
        config_path = WEIGHTS_DIR / f"{name}.json"
        return _Resolved(ModelConfig.from_file(config_path), WEIGHTS_DIR / f"{name}.safetensors", config_path)
    if ":" in name:
        return _resolve_tag(*name.split(":", 1))
    if Path(name).suffix in WEIGHT_SUFFIXES or os.sep in name:
        raise CheckpointError(f"checkpoint not found: {name}")
    return _Resolved(_arch_config(name), None)


def load(name: str, device: str | torch.device | None = None, precision: str = "fp32",
         arch: str | None = None, seed: int = 0) -> ClipModel:
    """Load a CLIP model by name or path, in eval mode.

    Args:
        name: shipped model ("shapes"), core_clip config ("shapes-tiny"), open_clip architecture ("ViT-B-32",
            random weights), "ARCH:TAG", "hf-hub:org/repo", or a local file/folder (see module docstring).
        device: defaults to CUDA when available, else CPU.
        precision: "fp32", "fp16" or "bf16" (weights are cast; embeddings are always returned in float32).
        arch: open_clip architecture for a bare weights file that has no config beside it.
        seed: seed of the random initialisation (models without weights; the caller's RNG is left untouched).
    """
    if precision not in PRECISIONS:
        raise CoreClipError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve(name, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = _build_open_clip(resolved.config.model_cfg)
    if resolved.config.image_activation is not None:
        replace_image_activation(clip, resolved.config.image_activation)
    if resolved.weights is None:
        log.warning("%s: no pretrained weights, the model is randomly initialised", name)
    else:
        state = resolved.weights if isinstance(resolved.weights, dict) else read_state_dict(resolved.weights)
        load_strict(clip, state, source=str(resolved.weights if not isinstance(resolved.weights, dict) else name))
    clip = clip.to(device=device, dtype=PRECISIONS[precision]).eval()
    return ClipModel(clip, resolved.config, name)
