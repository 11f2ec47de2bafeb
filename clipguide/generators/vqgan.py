"""``vqgan``: CLIP steers the continuous latents of a taming-transformers VQGAN (VQGAN+CLIP).

The parameters are latents z [B, D, H/f, W/f]; each decode snaps them to their nearest codebook entries with a
straight-through gradient, runs the VQGAN decoder, and maps [-1, 1] to [0, 1]. After every step z is clamped to the
codebook's per-channel range, so it never drifts where no code is.

Without an init image the latents start as a random code at every position ("codes"), or as the encoding of a simple
picture: one colour field ("flat") or a field of one colour with a blob of another ("blob"). With a ``palette`` the
colours of those pictures are not drawn at random but chosen among the palette's by the guidance's CLIP score for
the prompts, just before the first step: a small CLIP paints a shape far more readily by reshaping and recolouring a
blob than by raising one from a flat field, whose codes sit deep inside their cells. With ``blend`` every picture is
moved onto the blend of its blob start's two colours (:func:`onto_blend`), so that a decoder's ringing at edges or a
drift of colour cannot leave its pixels off the two colours that a two-colour picture is made of.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipguideError
from ..losses import segment_position
from ..palettes import PaletteLike, parse_palette
from .base import GENERATORS, OptimisedGenerator, check_init, check_size, clamp_with_grad

if TYPE_CHECKING:
    from ..guidance import CLIPGuidance
    from ..vqgan_model import VQGAN


STARTS = ("codes", "flat", "blob")
BLOB_SHARE = 0.2  # of the picture that a blob start's blob covers
CHUNK = 8         # start candidates encoded / decoded at once, so a big VQGAN at a large size still fits in memory


def blob_masks(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Masks [batch, 1, height, width] of 0 and 1: the top :data:`BLOB_SHARE` of a smooth random field (3 x 3 uniform
    noise from ``generator``, bicubically upsampled), one or two rounded blobs anywhere in the picture."""
    noise = torch.rand(batch, 1, 3, 3, generator=generator, device=generator.device)
    field = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
    level = field.flatten(1).quantile(1 - BLOB_SHARE, dim=1).view(-1, 1, 1, 1)
    return (field > level).float()


def onto_blend(images: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Every pixel moved to its nearest point on the segment between its picture's two colours.

    ``images [B, 3, H, W]`` and ``pairs [B, 2, 3]`` (a first and a second colour per picture, distinct) in [0, 1] ->
    ``[B, 3, H, W]`` in [0, 1]: ``first + t (second - first)``, t the pixel's least-squares position along the
    segment clamped to [0, 1] (:func:`~clipguide.generators.base.clamp_with_grad`: the gradient still flows where it
    leads back onto the segment). A picture already made of blends of the two colours is left as it is.
    """
    first, axis = pairs[:, 0, :, None, None], (pairs[:, 1] - pairs[:, 0])[:, :, None, None]
    return first + clamp_with_grad(segment_position(images, first, axis)) * axis


def start_pictures(start: str, palette: Optional[torch.Tensor], batch: int, height: int, width: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate start pictures [batch, K, 3, height, width] in [0, 1] for a "flat" or "blob" start, and their
    colours [batch, K, layers, 3] (layers: 1 for flat, 2 for blob: background, blob).

    Without a palette K = 1, with colours uniform in RGB from ``generator``: one per flat picture, a background's then
    a blob's for a blob picture. With a palette [M, 3] the candidates are every palette colour (flat, K = M) or every
    ordered pair of two different ones (blob, K = M (M - 1): background, blob), the same for every image. Blob masks
    (:func:`blob_masks`) are drawn after the colours.
    """
    device = generator.device
    layers = 1 if start == "flat" else 2
    if palette is None:
        colours = torch.rand(batch, 1, layers, 3, generator=generator, device=device)
    elif start == "flat":
        colours = palette[None, :, None].expand(batch, -1, -1, -1)
    else:
        first, second = torch.meshgrid(*[torch.arange(len(palette), device=device)] * 2, indexing="ij")
        distinct = first != second
        pairs = torch.stack([palette[first[distinct]], palette[second[distinct]]], dim=1)   # [M (M - 1), 2, 3]
        colours = pairs[None].expand(batch, -1, -1, -1)
    fields = colours[..., None, None]                                                      # [B, K, layers, 3, 1, 1]
    if start == "flat":
        return fields[:, :, 0].expand(-1, -1, -1, height, width), colours
    mask = blob_masks(batch, height, width, generator)[:, None]                            # [B, 1, 1, H, W]
    return fields[:, :, 0] * (1 - mask) + fields[:, :, 1] * mask, colours


@GENERATORS.register("vqgan")
class VQGANGenerator(OptimisedGenerator):
    """Latents of ``model`` (a shipped VQGAN name such as "shapes", or a .safetensors path with its .json).

    Args:
        batch, height, width: output images [batch, 3, height, width]; height and width must be multiples of the
            VQGAN's downsampling factor f.
        generator: draws the random start when there is no init.
        init: optional float [1 or B, 3, H, W] in [0, 1], encoded to start from.
        start: the start without an init: "codes" (a uniformly random code at every latent position, the
            VQGAN+CLIP scripts' start), "flat" (the encoding of a picture of one colour per image: guidance paints
            onto one field instead of clearing a mosaic) or "blob" (the encoding of a field of one colour with a
            random blob of another, :func:`blob_masks`, per image). The VQGAN renders those colours as well as its
            codes allow; the shipped ShapesWorld VQGAN, which knows its 8 palette colours, renders others as a
            tinted, faintly textured field.
        palette: the colours a flat or blob start is made of (:func:`~clipguide.palettes.parse_palette`: "shapes",
            "#rrggbb,..."): each image starts from the colour (flat) or ordered pair of colours (blob) whose picture
            the guidance's CLIP scores highest against the positive prompts (:meth:`choose_start`). None: colours
            uniform in RGB from ``generator``. A codes start or an init image uses no palette.
        blend: with a blob start, every picture is its decoded picture moved onto the blend of the start's two
            colours (:func:`onto_blend`; with a palette, the pair :meth:`choose_start` chose): one shape colour on
            one background whatever the decoder does at edges. Off by default, since it rules out any third colour;
            like ``palette``, other starts and an init image ignore it.
        model: the VQGAN to steer: a name or path for :func:`clipguide.vqgan_model.load_vqgan`, or a VQGAN (frozen).
        lr: Adam learning rate on the latents.
    """

    def __init__(self, batch: int, height: int, width: int, *, generator: torch.Generator,
                 init: Optional[torch.Tensor] = None, model: Union[str, "VQGAN"] = "shapes", lr: float = 0.1,
                 start: str = "codes", palette: Optional[PaletteLike] = None, blend: bool = False):
        from ..vqgan_model import VQGAN, load_vqgan  # taming is imported only when this backend is used

        super().__init__()
        check_size(batch, height, width)
        check_init(init, batch, height, width)
        if start not in STARTS:
            raise ClipguideError(f"vqgan start must be one of {', '.join(STARTS)}, got {start!r}")
        colours = None if palette is None else parse_palette(palette)
        device = generator.device
        self.vqgan = model.to(device).eval().requires_grad_(False) if isinstance(model, VQGAN) else load_vqgan(
            model, device=device)
        f = self.vqgan.config.factor
        if height % f or width % f:
            raise ClipguideError(f"vqgan output size must be a multiple of {f} (its downsampling factor), "
                                 f"got {width}x{height}")
        codes = self.vqgan.codebook.detach()
        # [B or 1, K, D, h, w]: start latents for choose_start to rank, per image or (1) the same for every image,
        # and their colours [B or 1, K, layers, 3]
        self.candidates: Optional[torch.Tensor] = None
        self.candidate_colours: Optional[torch.Tensor] = None
        pair = None
        if init is None and start == "codes":
            index = torch.randint(len(codes), (batch, height // f, width // f), generator=generator, device=device)
            z = codes[index].permute(0, 3, 1, 2)
        elif init is None:
            pictures, start_colours = start_pictures(start, None if colours is None else colours.to(device), batch,
                                                     height, width, generator)
            if colours is not None and start == "flat":
                pictures = pictures[:1]    # every image's candidates are the palette's fields: encode them once
            with torch.no_grad():
                latents = torch.cat([self.vqgan.encode(p * 2 - 1) for p in pictures.flatten(0, 1).split(CHUNK)])
            latents = latents.view(*pictures.shape[:2], *latents.shape[1:])
            z = latents[:, 0].expand(batch, -1, -1, -1)
            if blend and start == "blob":
                pair = start_colours[:, 0].contiguous()
            if latents.shape[1] > 1:
                self.candidates, self.candidate_colours = latents, start_colours[:len(latents)]
        else:
            with torch.no_grad():
                z = self.vqgan.encode(init.to(device).float() * 2 - 1).expand(batch, -1, -1, -1)
        self.z = nn.Parameter(z.contiguous())
        self.register_buffer("z_min", codes.min(dim=0).values.view(1, -1, 1, 1))
        self.register_buffer("z_max", codes.max(dim=0).values.view(1, -1, 1, 1))
        self.register_buffer("pair", pair)   # [B, 2, 3] with blend: the colours every picture is a blend of
        self.lr = lr

    def shared_options(self) -> dict:
        """The loaded (frozen) VQGAN, for another instance to steer."""
        return {"model": self.vqgan}

    def _pictures(self, z: torch.Tensor, pairs: Optional[torch.Tensor]) -> torch.Tensor:
        """Latents [N, D, h, w] -> images [N, 3, H, W] in [0, 1], differentiable (straight-through quantisation),
        moved onto the blends of ``pairs`` [N, 2, 3] unless that is None."""
        z_q = self.vqgan.quantize_st(z)[0]
        # the decoder runs under bf16 autocast on CUDA (code lookup stays fp32: argmin over near-equal distances)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=z.device.type == "cuda"):
            x = self.vqgan.decode(z_q)
        x = clamp_with_grad((x.float() + 1) / 2)
        return x if pairs is None else onto_blend(x, pairs)

    def decode(self) -> torch.Tensor:
        return self._pictures(self.z, self.pair)

    def choose_start(self, guidance: "CLIPGuidance") -> None:
        """With a palette start, start each image from its candidate whose picture (with ``blend``, moved onto the
        candidate's own colours) ``guidance.clip_score`` rates highest (the first on a tie, or when no prompt is
        positive); once."""
        if self.candidates is None:
            return
        best, best_colours = [], []
        for latents, colours in zip(self.candidates, self.candidate_colours):
            pictures = [self._pictures(z, None if self.pair is None else c)
                        for z, c in zip(latents.split(CHUNK), colours.split(CHUNK))]
            k = int(guidance.clip_score(torch.cat(pictures)).argmax())
            best.append(latents[k])
            best_colours.append(colours[k])
        self.z.copy_(torch.stack(best).expand_as(self.z))
        if self.pair is not None:
            self.pair.copy_(torch.stack(best_colours))
        self.candidates = self.candidate_colours = None

    def constrain(self) -> None:
        self.z.clamp_(self.z_min, self.z_max)
