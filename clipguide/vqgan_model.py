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
            self.quant_conv = nn.Conv2d(dd["z_channels"], config.embed_dim, 1)
        else:
            self.quantize = GumbelQuantize(dd["z_channels"], config.embed_dim, n_embed=config.n_embed)
            self.quant_conv = nn.Conv2d(dd["z_channels"], dd["z_channels"], 1)
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

    def quantize_st(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B, D, h, w] -> (nearest codes [B, D, h, w] with the gradient passed straight to z,
        codebook loss: ||sg(z_q) - z||^2 * 0.25 + ||z_q - sg(z)||^2)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = self.codebook
        index = torch.cdist(flat, codes).argmin(dim=1)
        z_q = codes[index].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        loss = 0.25 * F.mse_loss(z, z_q.detach()) + F.mse_loss(z_q, z.detach())
        return z + (z_q - z).detach(), loss

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, D, h, w] -> images [B, 3, h*f, w*f], nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction [B, 3, H, W] and codebook loss of images in [-1, 1]."""
        z_q, loss = self.quantize_st(self.encode(x))
        return self.decode(z_q), loss

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (.safetensors) and its .json config atomically."""
        path = Path(path).with_suffix(".safetensors")
        save_safetensors({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path)
        save_json(asdict(self.config), path.with_suffix(".json"))
        return path


def load_vqgan(name: str | os.PathLike, device: str | torch.device | None = None) -> VQGAN:
    """A shipped name ("shapes" -> clipguide/weights/vqgan-shapes.safetensors) or a .safetensors file with its .json
    config beside it; keys and shapes are checked strictly. Returns the model in eval mode with frozen weights."""
    path = Path(name)
    if not path.suffix:
        path = WEIGHTS / f"vqgan-{name}.safetensors"
        if not path.is_file():
            shipped = sorted(p.stem.removeprefix("vqgan-") for p in WEIGHTS.glob("vqgan-*.safetensors"))
            raise ClipguideError(f"no VQGAN called {name!r}; shipped: {', '.join(shipped) or 'none'}, "
                                 "or pass a .safetensors path with its .json beside it")
    config_path = path.with_suffix(".json")
    if not path.is_file() or not config_path.is_file():
        raise ClipguideError(f"VQGAN needs {path} and {config_path}")
    model = VQGAN(VQGANConfig(**json.loads(config_path.read_text())))
    load_strict(model, read_state_dict(path), str(path))
    model.requires_grad_(False)
    return model.to(device or "cpu").eval()
