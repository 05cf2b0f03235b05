"""Patch features: ImageNet ResNet50 truncated after ``layer3``, average-pooled to 1024-d.

This is CLAM's ``resnet50_trunc`` encoder (torchvision's IMAGENET1K_V1 weights, which
timm calls ``resnet50.tv_in1k``): patches resized to 224 px (CLAM's ``target_patch_size``;
None keeps them as read, like CLAM before April 2024), ImageNet mean/std, the
ResNet50 stem and ``layer1``-``layer3`` (1024 channels, stride 16), adaptive average
pooling. Weights come from a local file or torchvision's cache, never from the network.
torchvision is an optional dependency, imported here only when a model is built.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gimplib.utils import DataError, get_device

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PatchDataset",
    "ResNet50Trunc",
    "build_encoder",
    "default_weights_path",
    "embed_patches",
    "extract_features",
    "weights_description",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


class ResNet50Trunc(nn.Module):
    """ResNet50 up to ``layer3`` + global average pooling, with ImageNet normalisation built in.

    Args:
        normalize: apply ImageNet mean/std inside ``forward`` (inputs in [0, 1] or uint8).
    """

    feat_dim = 1024
    name = "resnet50_trunc"

    def __init__(self, *, normalize: bool = True) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        for name in TRUNK:  # same attribute names as torchvision, so its state dict loads
            setattr(self, name, getattr(net, name))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of patches.

        Args:
            images: (b, 3, h, w) uint8 (0-255) or float in [0, 1].

        Returns:
            (b, 1024) features.
        """
        assert images.ndim == 4 and images.shape[1] == 3, f"expected (b, 3, h, w), got {tuple(images.shape)}"
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        x = x.to(self.mean.dtype)
        if self.normalize:
            x = (x - self.mean) / self.std
        for name in TRUNK:
            x = getattr(self, name)(x)
        return rearrange(self.pool(x), "b c 1 1 -> b c")


def default_weights_path() -> Path:
    """Where torchvision caches ResNet50 IMAGENET1K_V1 weights (``$TORCH_HOME/hub/checkpoints``)."""
    from torchvision.models import ResNet50_Weights

    name = ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ResNet50 trunk's weights in ``path`` (wrappers and ``module.``/``model.``/``backbone.`` removed)."""
    from gimplib.data.wsi.encoders import load_weights_file

    state = load_weights_file(path, prefixes=("module.", "model.", "backbone."))
    return {key: value for key, value in state.items() if key.split(".", 1)[0] in TRUNK}


def weights_description(*, weights: str | os.PathLike | None = None, random_weights: bool = False, seed: int = 0) -> str:
    """How the encoder's weights are named in the extraction settings."""
    if random_weights:
        return f"random(seed={seed})"
    return f"file:{Path(weights) if weights is not None else default_weights_path()}"


#: The encoder name gimp-extract records in every bag (``encoder`` attribute).
ENCODER_NAME = "resnet50_trunc"


def weights_identity(*, weights: str | os.PathLike | None = None, random_weights: bool = False) -> str:
    """What a bag records about the encoder's weights: ``"random"`` or ``"sha256:<hex>"`` of the file."""
    import hashlib

    if random_weights:
        return "random"
    path = Path(weights) if weights is not None else default_weights_path()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def build_encoder(
    *,
    name: str = "resnet50_trunc",
    weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> tuple[nn.Module, str]:
    """Build a patch encoder in eval mode: ResNet50-trunc (default) or a foundation model.

    Args:
        name: ``"resnet50_trunc"`` (CLAM's) or a foundation model of
            :data:`~gimplib.data.wsi.encoders.ENCODERS` (``uni_v1``, ``uni_v2``, ``virchow2``,
            ``gigapath``, ``hoptimus0``; built by timm from ``weights``, see
            :func:`~gimplib.data.wsi.encoders.build_timm_encoder`).
        weights: a torchvision ResNet50 state dict (full or truncated); None = torchvision's
            cached IMAGENET1K_V1 file, which must already be on disk.
        random_weights: skip loading (seeded random init) -- for tests and timing only;
            features are then meaningless.
        seed: seed of the random init.

    Returns:
        ``(model, description)``; the description names the weights and goes into the
        extraction settings.
    """
    from gimplib.data.wsi.encoders import build_timm_encoder, encoder_spec

    if encoder_spec(name).arch != "resnet50_trunc":
        model = build_timm_encoder(name, weights=weights, random_weights=random_weights, seed=seed, **overrides)
        return model, weights_description(weights=weights, random_weights=random_weights, seed=seed)
    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ResNet50Trunc()
        return model.eval(), weights_description(random_weights=True, seed=seed)
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        where = "given" if weights is not None else "torchvision's cache"
        raise DataError(
            f"weights {path} ({where}) not found; download torchvision's ResNet50 IMAGENET1K_V1 "
            "file once on a machine with network access and pass its path (--weights), or use "
            "random weights for a test run (--random-weights); nothing is downloaded here"
        )
    model = ResNet50Trunc()
    state = _load_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"weights {path}: not a ResNet50 state dict (missing {list(missing)[:4]}, "
            f"unexpected {list(unexpected)[:4]})"
        )
    return model.eval(), weights_description(weights=path)


class PatchDataset(Dataset):
    """Patches of one slide, read with OpenSlide and resized, as uint8 tensors.

    The slide is opened lazily in each DataLoader worker (OpenSlide handles do not
    survive a fork). Transparent pixels (outside scanned areas, or past the slide border
    for CLAM's padded edge patches) become black as in CLAM (its ``.convert('RGB')`` drops
    the alpha of OpenSlide's transparent black) or white.

    Args:
        slide_path: the slide file.
        coords: (n, 2) level-0 (x, y) top-left corners.
        level: pyramid level to read from.
        read_size: side read at ``level``.
        out_size: side of the returned patch (224 for the ResNet; None = ``read_size``,
            no resize).
        fill: ``"black"`` (CLAM) or ``"white"`` for transparent pixels.
    """

    def __init__(
        self,
        slide_path: str | os.PathLike,
        coords: np.ndarray,
        *,
        level: int,
        read_size: int,
        out_size: int | None = 224,
        fill: str = "black",
    ) -> None:
        if fill not in ("black", "white"):
            raise DataError(f"slide {slide_path}: fill={fill!r}; expected 'black' (CLAM) or 'white'")
        if out_size is not None and out_size < 1:
            raise DataError(f"slide {slide_path}: out_size={out_size}; expected a positive side or None")
        self.slide_path = Path(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64)
        self.level = int(level)
        self.read_size = int(read_size)
        self.out_size = int(out_size) if out_size is not None else self.read_size
        self.fill = fill
        self._slide: Any = None

    def __len__(self) -> int:
        return len(self.coords)

    def read(self, index: int) -> Image.Image:
        """The patch at ``index`` as an RGB image of ``out_size``."""
        if self._slide is None:
            from gimplib.data.wsi.slide import open_slide

            self._slide = open_slide(self.slide_path)
        x, y = (int(v) for v in self.coords[index])
        tile = self._slide.read_region((x, y), self.level, (self.read_size, self.read_size))
        if self.fill == "black":
            img = tile.convert("RGB")
        else:
            white = Image.new("RGBA", tile.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, tile.convert("RGBA")).convert("RGB")
        if img.size != (self.out_size, self.out_size):
            img = img.resize((self.out_size, self.out_size), Image.Resampling.BILINEAR)
        return img

    def __getitem__(self, index: int) -> torch.Tensor:
        arr = np.asarray(self.read(index), dtype=np.uint8)
        return rearrange(torch.from_numpy(arr.copy()), "h w c -> c h w")


@torch.inference_mode()
def embed_patches(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    half: bool,
    progress: bool = False,
    desc: str = "patches",
) -> np.ndarray:
    """Run the encoder over a loader of uint8 patch batches (b, 3, h, w).

    Returns:
        (n, feat_dim) float32 features, in loader order.
    """
    from tqdm.auto import tqdm

    out = []
    autocast = torch.autocast(device_type="cuda", dtype=torch.float16) if half else contextlib.nullcontext()
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    with autocast, tqdm(total=total, desc=desc, unit="patch", disable=not progress, leave=False) as bar:
        for images in loader:
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            out.append(model(images).float().cpu())
            bar.update(len(images))  # patches/s and time left inside the slide
    return torch.cat(out).numpy()


def extract_features(
    slide_path: str | os.PathLike,
    coords: np.ndarray,
    model: nn.Module,
    *,
    level: int,
    read_size: int,
    out_size: int | None = 224,
    fill: str = "black",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    half: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """ResNet50-trunc features of the patches of one slide.

    Args:
        slide_path: the slide.
        coords: (n, 2) level-0 (x, y) of the patches.
        model: the encoder (:func:`build_encoder`); moved to ``device`` here.
        level: pyramid level to read from.
        read_size: side read at ``level``; resized to ``out_size``.
        out_size: network input side (224, CLAM's ``target_patch_size``; None = no resize).
        fill: colour of transparent pixels, ``"black"`` (CLAM) or ``"white"``.
        batch_size: patches per forward pass.
        num_workers: DataLoader workers reading patches.
        device: "auto", "cpu", "cuda", ...
        half: float16 autocast on CUDA (ignored elsewhere); default False, float32 as CLAM.
        progress: show a tqdm bar.

    Returns:
        (n, 1024) float32 features in the order of ``coords``.
    """
    device = get_device(device)
    half = bool(half and device.type == "cuda")
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dataset = PatchDataset(slide_path, coords, level=level, read_size=read_size, out_size=out_size, fill=fill)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    return embed_patches(model, loader, device=device, half=half, progress=progress, desc=Path(slide_path).name)
