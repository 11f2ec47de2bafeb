"""Taming-transformers VQGANs without taming's training code: encoder, quantiser and decoder built directly.

``taming.models.vqgan.VQModel`` is a Lightning module whose constructor builds the training loss (LPIPS, which
downloads VGG weights) and whose module imports Lightning APIs that no longer exist. :class:`VQGAN` builds the same
submodules from the same ``ddconfig`` with the same parameter names, so taming checkpoints load into it strictly,
and the loss is never built.

Shipped models live in ``clipguide/weights/vqgan-NAME.safetensors`` + ``.json`` ({"kind", "ddconfig", "n_embed",
"embed_dim"}) and load as ``load_vqgan("NAME")``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2
from torch import nn

from core_clip.checkpoint import load_strict, read_state_dict, save_json, save_safetensors

from .errors import ClipguideError
from .taming_hub import TAMING_CHECKPOINTS, fetch_taming

WEIGHTS = Path(__file__).parent / "weights"
KINDS = ("vq", "gumbel")


@dataclass
class VQGANConfig:
    """What builds a VQGAN: taming's ``ddconfig`` (encoder / decoder), codebook size and code width, and the kind
    of quantiser ("vq": nearest code; "gumbel": GumbelQuantize)."""

    ddconfig: dict = field(default_factory=dict)
    n_embed: int = 256
    embed_dim: int = 32
    kind: str = "vq"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ClipguideError(f"VQGAN kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        missing = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "resolution",
                   "z_channels"} - set(self.ddconfig)
        if missing:
            raise ClipguideError(f"VQGAN ddconfig lacks {', '.join(sorted(missing))}")

    @property
    def factor(self) -> int:
        """Downsampling factor: an image side of S gives a latent side of S / factor."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codes: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Index (int64 [N]) of the code in ``codes`` [K, D] nearest to each row of ``z`` [N, D] (Euclidean).

    Ranks ``|c|^2 - 2 z.c`` (the squared distance less the row's constant ``|z|^2``, as ``torch.cdist`` computes it
    for many rows) ``chunk`` rows at a time into one reused buffer: the search is bound by writing and re-reading
    the [N, K] distances, so the buffer is kept about cache-sized (by default ``2**21 // K`` rows: 64 for 32,768
    codes, 16 for 131,072). On this project's CPU that takes about half the time of one [N, K] tensor (8,192
    latents against 32,768 codes), and 40% of the time of 256-row chunks for one guided picture's 256 latents against
    131,072 codes of 6 dimensions (the shipped VQGAN), where the distances are nearly all of the work.
    """
    z, codes = z.float(), codes.float()  # in fp32 even under autocast: near-equal distances decide the argmin
    chunk = chunk or max(1, 2**21 // len(codes))
    norms, codes_t = codes.square().sum(1), codes.T.contiguous()
    buffer = z.new_empty(min(chunk, len(z)), len(codes))
    with torch.autocast(z.device.type, enabled=False):
        return torch.cat([torch.addmm(norms, rows, codes_t, alpha=-2, out=buffer[:len(rows)]).argmin(dim=1)
                          for rows in z.split(chunk)])


def latent_rows(z: torch.Tensor) -> torch.Tensor:
    """Latents [B, D, h, w] -> one row per position, [B * h * w, D] (batch, then row, then column order)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


class VQGAN(nn.Module):
    """Encoder -> (quant_conv) -> codebook -> (post_quant_conv) -> decoder, taming's VQModel / GumbelVQ layout.

    Images are float [B, 3, H, W] in [-1, 1] (taming's convention); :meth:`encode` gives the continuous latents
    [B, embed_dim, H / f, W / f] before quantisation, :meth:`quantize` snaps them to codes with a straight-through
    gradient, :meth:`decode` maps quantised latents back to images.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        dd = config.ddconfig
        self.encoder = Encoder(**dd)
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints its latent shape
            self.decoder = Decoder(**dd)
        if config.kind == "vq":
            self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25)
        else:  # taming's GumbelVQ projects quant_conv's output to code logits (its embed_dim equals z_channels)
            self.quantize = GumbelQuantize(config.embed_dim, config.embed_dim, n_embed=config.n_embed)
        self.quant_conv = nn.Conv2d(dd["z_channels"], config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, dd["z_channels"], 1)

    @property
    def codebook(self) -> torch.Tensor:
        """[n_embed, embed_dim] code vectors."""
        return self.quantize.embed.weight if self.config.kind == "gumbel" else self.quantize.embedding.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> continuous latents [B, embed_dim, H/f, W/f] (for gumbel: the code
        embedding of each position's most likely code)."""
        h = self.quant_conv(self.encoder(x))
        if self.config.kind == "gumbel":
            return self.quantize.embed(self.quantize.proj(h).argmax(dim=1)).permute(0, 3, 1, 2)
        return h

    def quantize_st(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents [B, D, h, w] -> (nearest codes [B, D, h, w] with the gradient passed straight to z,
        codebook loss: ||sg(z_q) - z||^2 * 0.25 + ||z_q - sg(z)||^2, code indices int64 [B * h * w])."""
        codes = self.codebook
        index = nearest_codes(latent_rows(z), codes)
        z_q = codes[index].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        loss = 0.25 * F.mse_loss(z, z_q.detach()) + F.mse_loss(z_q, z.detach())
        return z + (z_q - z).detach(), loss, index

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, D, h, w] -> images [B, 3, h*f, w*f], nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction [B, 3, H, W] and codebook loss of images in [-1, 1]."""
        z_q, loss, _ = self.quantize_st(self.encode(x))
        return self.decode(z_q), loss

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.safetensors) and its .json config atomically."""
        path = Path(path).with_suffix(".safetensors")
        save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path)
        save_json(asdict(self.config), path.with_suffix(".json"))
        return path


# Architectures of the public taming checkpoints (taming-transformers' configs), for random-weight use and tests.
TAMING_CONFIGS = {
    "imagenet-f16-1024": VQGANConfig(n_embed=1024, embed_dim=256, ddconfig=dict(
        double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4],
        num_res_blocks=2, attn_resolutions=[16], dropout=0.0)),
    "imagenet-f16-16384": VQGANConfig(n_embed=16384, embed_dim=256, ddconfig=dict(
        double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4],
        num_res_blocks=2, attn_resolutions=[16], dropout=0.0)),
    "gumbel-f8": VQGANConfig(n_embed=8192, embed_dim=256, kind="gumbel", ddconfig=dict(
        double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 4],
        num_res_blocks=2, attn_resolutions=[32], dropout=0.0)),
}
_TAMING_KINDS = {"VQModel": "vq", "GumbelVQ": "gumbel"}


def config_from_taming(yaml_path: str | os.PathLike) -> tuple[VQGANConfig, str]:
    """A taming yaml -> (config, state-dict key prefix). The kind comes from the config's ``target`` class, never
    from the file name; a Net2NetTransformer's first stage is used (its keys start with "first_stage_model.")."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(yaml_path).read_text())
        model = cfg["model"]
        target, params, prefix = model["target"], model["params"], ""
        if target.endswith(".Net2NetTransformer"):
            first = params["first_stage_config"]
            target, params, prefix = first["target"], first["params"], "first_stage_model."
        kind = _TAMING_KINDS.get(target.rsplit(".", 1)[-1])
        if kind is None:
            raise ClipguideError(f"{yaml_path}: model target {target} is not a taming VQModel, GumbelVQ or "
                                 "Net2NetTransformer")
        return VQGANConfig(ddconfig=dict(params["ddconfig"]), n_embed=int(params["n_embed"]),
                           embed_dim=int(params["embed_dim"]), kind=kind), prefix
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ClipguideError(f"cannot read taming config {yaml_path}: {type(e).__name__}: {e}") from None


class _LightningStandIn:
    """What a Lightning callback class named in a checkpoint unpickles to: an inert object keeping its state.

    Lightning writes its callbacks' classes into checkpoints (``{"callbacks": {ModelCheckpoint: {...}}}``), so the
    published taming ckpts fail a plain weights-only load. Allowing these names, and only these, as stand-ins
    reads them without importing Lightning or running any code from the file."""

    def __setstate__(self, state) -> None:
        self.state = state


class _LightningDict:
    """Stand-in for Lightning's ``AttributeDict`` (hyper-parameters): unpickles to a plain dict, the only kind of
    mapping a weights-only load fills."""

    def __new__(cls, *args, **kwargs) -> dict:
        return {}


_LIGHTNING_STAND_INS = [
    (stand_in, f"{package}.{name}")
    for package in ("pytorch_lightning", "lightning.pytorch")
    for stand_in, name in ((_LightningStandIn, "callbacks.model_checkpoint.ModelCheckpoint"),
                           (_LightningStandIn, "callbacks.early_stopping.EarlyStopping"),
                           (_LightningDict, "utilities.parsing.AttributeDict"))
]


def load_taming(yaml_path: str | os.PathLike, ckpt_path: str | os.PathLike) -> VQGAN:
    """A taming yaml + Lightning ckpt pair. The ckpt loads with ``weights_only=True`` plus stand-ins for
    Lightning's callback classes (a ckpt that needs any other pickled object is refused, never executed);
    training-only keys (the loss and discriminator) are dropped and the rest must match the config exactly."""
    config, prefix = config_from_taming(yaml_path)
    with torch.serialization.safe_globals(_LIGHTNING_STAND_INS):
        state = read_state_dict(ckpt_path)
    state = {k[len(prefix):]: v for k, v in state.items()
             if k.startswith(prefix) and not k.startswith(prefix + "loss.")}
    model = VQGAN(config)
    load_strict(model, state, f"{ckpt_path} with {yaml_path}")
    return model


def load_vqgan(name: str | os.PathLike, device: str | torch.device | None = None) -> VQGAN:
    """A shipped name ("shapes" -> clipguide/weights/vqgan-shapes.safetensors), a public taming model's name
    (:data:`clipguide.taming_hub.TAMING_CHECKPOINTS`, fetched to a local cache once), a .safetensors file with its
    .json config beside it, or a taming .yaml with its .ckpt beside it (same stem); keys and shapes are checked
    strictly. Returns the model in eval mode with frozen weights."""
    path = fetch_taming(str(name)) if str(name) in TAMING_CHECKPOINTS else Path(name)
    if path.suffix in (".yaml", ".yml"):
        model = load_taming(path, path.with_suffix(".ckpt"))
    else:
        if not path.suffix:
            path = WEIGHTS / f"vqgan-{name}.safetensors"
            if not path.is_file():
                shipped = sorted(p.stem.removeprefix("vqgan-") for p in WEIGHTS.glob("vqgan-*.safetensors"))
                raise ClipguideError(f"no VQGAN called {name!r}; shipped: {', '.join(shipped) or 'none'}; public: "
                                     f"{', '.join(TAMING_CHECKPOINTS)}; or pass a .safetensors path with its .json "
                                     "beside it, or a taming .yaml with its .ckpt")
        config_path = path.with_suffix(".json")
        if not path.is_file() or not config_path.is_file():
            raise ClipguideError(f"VQGAN needs {path} and {config_path}")
        model = VQGAN(VQGANConfig(**json.loads(config_path.read_text())))
        load_strict(model, read_state_dict(path), str(path))
    model.requires_grad_(False)
    return model.to(device or "cpu").eval()
