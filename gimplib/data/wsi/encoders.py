"""Patch encoders of ``gimp-extract --encoder NAME``: CLAM's ResNet50-trunc and the pathology foundation models timm builds.

Every encoder is built offline: the architecture comes from timm (``pretrained=False``) and
the weights from a file the user downloaded under the model's own licence (gated on the
Hugging Face Hub); nothing is downloaded here. Each :class:`EncoderSpec` says how the
model's card prepares a patch (resize, crop, normalisation) and how the embedding is
pooled; :class:`TimmPatchEncoder` does exactly that on uint8 patch batches, so that
:func:`~gimplib.data.wsi.features.extract_features` can feed every encoder the same way.
The names follow TRIDENT's (``uni_v1``, ``uni_v2``, ``virchow2``, ``gigapath``,
``hoptimus0``), so bags from either tool carry the same encoder name.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gimplib.utils import DataError

__all__ = ["ENCODERS", "EncoderSpec", "TimmPatchEncoder", "build_timm_encoder", "encoder_spec", "load_weights_file"]

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class EncoderSpec:
    """One patch encoder: architecture, input preparation, pooling, width, licence.

    Attributes:
        name: the ``--encoder`` name.
        feat_dim: width of the embedding written to the bags.
        arch: timm model name (``"resnet50_trunc"`` for CLAM's encoder, built by torchvision).
        timm_kwargs: arguments of ``timm.create_model`` that give the published architecture.
        input_size: the network's input side.
        resize: side the patch is resized to before an optional centre crop to ``input_size``.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        mean, std: normalisation of [0, 1] RGB.
        pool: ``"token"`` (the model's own pooled output) or ``"cls+mean"`` (Virchow2:
            the class token concatenated with the mean of the patch tokens).
        patch_size: patch side (pixels at 20x) the model was trained on, as its card says.
        licence: the weights' licence as their model card states it.
        weights_from: where users request the weights.
        weights_file: the file to download there.
    """

    name: str
    feat_dim: int
    arch: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    resize: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    pool: str = "token"
    patch_size: int = 256
    licence: str = ""
    weights_from: str = ""
    weights_file: str = ""

    def transform_settings(self) -> dict[str, Any]:
        """What goes into the h5 attributes and the settings JSON about patch preparation."""
        crop = f", centre crop {self.input_size}" if self.resize != self.input_size else ""
        return {
            "encoder": self.name,
            "feat_dim": self.feat_dim,
            "resize": f"{self.resize} px {self.interpolation}{crop}",
            "normalization": f"mean={list(self.mean)}, std={list(self.std)}",
            "pool": self.pool,
        }


def _swiglu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


#: name -> spec. Architectures from each model card; parameter counts are checked in the tests.
ENCODERS: dict[str, EncoderSpec] = {
    "resnet50_trunc": EncoderSpec(
        name="resnet50_trunc", feat_dim=1024, arch="resnet50_trunc", licence="BSD-3-Clause (torchvision)",
        weights_from="torchvision ResNet50_Weights.IMAGENET1K_V1", weights_file="resnet50-0676ba61.pth",
    ),
    "uni_v1": EncoderSpec(
        name="uni_v1", feat_dim=1024, arch="vit_large_patch16_224",
        timm_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        licence="CC-BY-NC-ND-4.0", weights_from="https://huggingface.co/MahmoodLab/UNI",
        weights_file="pytorch_model.bin",
    ),
    "uni_v2": EncoderSpec(
        name="uni_v2", feat_dim=1536, arch="vit_giant_patch14_224",
        timm_kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                         mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
                         dynamic_img_size=True, swiglu=True),
        licence="CC-BY-NC-ND-4.0", weights_from="https://huggingface.co/MahmoodLab/UNI2-h",
        weights_file="pytorch_model.bin",
    ),
    "virchow2": EncoderSpec(
        name="virchow2", feat_dim=2560, arch="vit_huge_patch14_224",
        timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                         global_pool="", dynamic_img_size=True, swiglu=True),
        interpolation="bicubic", pool="cls+mean", patch_size=224, licence="CC-BY-NC-ND-4.0",
        weights_from="https://huggingface.co/paige-ai/Virchow2", weights_file="pytorch_model.bin",
    ),
    "gigapath": EncoderSpec(
        name="gigapath", feat_dim=1536, arch="vit_giant_patch14_dinov2",
        timm_kwargs=dict(img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                         mlp_ratio=5.33334, num_classes=0),
        resize=256, interpolation="bicubic", licence="Apache-2.0 (gated: accept the conditions on its card)",
        weights_from="https://huggingface.co/prov-gigapath/prov-gigapath", weights_file="pytorch_model.bin",
    ),
    "hoptimus0": EncoderSpec(
        name="hoptimus0", feat_dim=1536, arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=False),
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), patch_size=224,
        licence="Apache-2.0", weights_from="https://huggingface.co/bioptimus/H-optimus-0",
        weights_file="pytorch_model.bin",
    ),
}


def encoder_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered as ``name`` (a DataError lists the known names)."""
    key = str(name).lower().replace("-", "_")
    if key not in ENCODERS:
        raise DataError(f"unknown patch encoder {name!r}; known: {', '.join(ENCODERS)}")
    return ENCODERS[key]


def _create(spec: EncoderSpec, overrides: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"the {spec.name} encoder needs timm: pip install 'gimplib[wsi]'") from err
    kwargs = dict(spec.timm_kwargs)
    if kwargs.pop("swiglu", False):
        kwargs.update(_swiglu())
    kwargs.update(overrides)
    return timm.create_model(spec.arch, pretrained=False, **kwargs)


class TimmPatchEncoder(nn.Module):
    """A timm foundation model with its card's patch preparation and pooling built in.

    Args:
        spec: the encoder's :class:`EncoderSpec`.
        model: the timm model (``num_classes=0``).
    """

    def __init__(self, *, spec: EncoderSpec, model: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.feat_dim = spec.feat_dim if spec.pool != "cls+mean" else 2 * model.num_features
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, h, w) or [0, 1] float patches -> normalised (b, 3, input_size, input_size)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        s = self.spec
        if x.shape[-2:] != (s.resize, s.resize):
            x = F.interpolate(x, size=(s.resize, s.resize), mode=s.interpolation, align_corners=False, antialias=True)
        if s.resize != s.input_size:
            top = (s.resize - s.input_size) // 2
            x = x[..., top:top + s.input_size, top:top + s.input_size]
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of patches.

        Args:
            images: (b, 3, h, w) uint8 (0-255) or float in [0, 1], any side (resized here).

        Returns:
            (b, feat_dim) embeddings.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (b, 3, h, w), got {tuple(images.shape)}"
        out = self.model(self.prepare(images))
        if self.spec.pool == "cls+mean":  # tokens (b, 1 + registers + patches, d)
            prefix = getattr(self.model, "num_prefix_tokens", 1)
            out = torch.cat([out[:, 0], out[:, prefix:].mean(dim=1)], dim=-1)
        return out


def load_weights_file(path: str | os.PathLike, *, prefixes: tuple[str, ...] = ("module.", "backbone.")
                      ) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` / ``.bin`` / ``.pth`` (``weights_only``); the wrappers
    ``state_dict`` / ``model`` / ``teacher`` and the key ``prefixes`` (in that order) removed."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"weights {path}: cannot be read as a state dict ({err})") from err
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise DataError(f"weights {path}: holds a {type(obj).__name__}; expected a state dict")
    out = {}
    for key, value in obj.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def build_timm_encoder(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> TimmPatchEncoder:
    """Build a foundation-model encoder in eval mode from a local weights file.

    Args:
        name: a key of :data:`ENCODERS` other than ``resnet50_trunc``.
        weights: the model's weights file (``pytorch_model.bin`` / ``.safetensors``) as
            downloaded from its model card; required unless ``random_weights``.
        random_weights: seeded random init, for tests and timing only (features are meaningless).
        seed: seed of the random init.
        **overrides: ``timm.create_model`` arguments replacing the spec's (e.g. ``depth=1``
            to test a smaller model of the same widths); only with ``random_weights``.

    Raises:
        DataError: no weights file given or found (the message says where to get it), or
            the file does not hold this architecture's weights.
    """
    spec = encoder_spec(name)
    if spec.arch == "resnet50_trunc":
        raise DataError("resnet50_trunc is built by gimplib.data.wsi.features.build_encoder")
    if not random_weights:
        if overrides:
            raise DataError(f"{name}: architecture overrides {sorted(overrides)} are for random weights only")
        if weights is None or not Path(weights).is_file():
            given = f"weights file {weights} not found" if weights is not None else "no weights file given"
            raise DataError(
                f"encoder {name}: {given}; download {spec.weights_file} from {spec.weights_from} (licence "
                f"{spec.licence}; you accept its terms there) and pass its path with --weights; nothing is "
                "downloaded here"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(spec, overrides)
    if not random_weights:
        state = load_weights_file(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DataError(
                f"weights {weights}: not the {name} architecture ({spec.arch}): missing {list(missing)[:4]}, "
                f"unexpected {list(unexpected)[:4]}"
            )
    return TimmPatchEncoder(spec=spec, model=model).eval()


def spec_dict(spec: EncoderSpec) -> dict[str, Any]:
    """The spec as JSON-ready values (timm layer classes by name)."""
    d = asdict(spec)
    d["timm_kwargs"] = {k: v for k, v in spec.timm_kwargs.items()}
    return d
