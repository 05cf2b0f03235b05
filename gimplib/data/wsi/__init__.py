"""Whole-slide images to CLAM bags: tissue segmentation, patching, ResNet50-trunc features, heatmaps.

The ``gimp-extract`` command (:func:`main`) and notebook 01 call :func:`process_slides`.
OpenSlide and torchvision (the ``wsi`` extra) are imported only when a slide is opened
or an encoder is built, so importing this package needs neither.

Modules:
    slide     opening slides, mpp / magnification, pyramid level choice
    clam      CLAM mode (default): CLAM's contours, per-contour grid and presets, coordinate for coordinate
    tissue    field mode: HSV-saturation tissue mask (CLAM's recipe on pixel masks) and the mask PNG
    patching  field mode: the patch grid at a target magnification; CLAM's patches h5
    features  ResNet50 truncated after layer3 (1024-d) and batched extraction
    encoders  --encoder: UNI, UNI2-h, Virchow2, Prov-GigaPath, H-optimus-0 built by timm from local weights
    pipeline  one slide / a folder -> cohort folder, resumable, with a status CSV
    shard     --shard i/n and the per-slide lock files that let several workers share a cohort
    cli       the gimp-extract command
    heatmap   per-patch attention over the slide thumbnail
"""

from gimplib.data.wsi.clam import CLAM_PRESETS, ClamParams, ClamSegmentation, clam_patch_coords, clam_patch_grid, clam_segment
from gimplib.data.wsi.features import (
    PatchDataset,
    ResNet50Trunc,
    build_encoder,
    default_weights_path,
    extract_features,
)
from gimplib.data.wsi.cli import main
from gimplib.data.wsi.encoders import ENCODERS, EncoderSpec, build_timm_encoder, encoder_spec
from gimplib.data.wsi.heatmap import patch_score_image, patch_size_level0, plot_attention_heatmap
from gimplib.data.wsi.patching import PatchGrid, patch_grid, read_patches_h5, write_patches_h5
from gimplib.data.wsi.pipeline import (
    EXTRACT_MODES,
    SLIDE_EXTENSIONS,
    ExtractConfig,
    config_from_settings,
    encoder_identity,
    find_slides,
    process_slide,
    process_slides,
    update_dataset_csv,
)
from gimplib.data.wsi.slide import SlideInfo, choose_level, open_slide, read_slide_info, resolve_magnification
from gimplib.data.wsi.tissue import TissueMask, TissueParams, segment_tissue, slide_tissue_mask

__all__ = [
    "CLAM_PRESETS",
    "ENCODERS",
    "EXTRACT_MODES",
    "SLIDE_EXTENSIONS",
    "ClamParams",
    "ClamSegmentation",
    "EncoderSpec",
    "ExtractConfig",
    "PatchDataset",
    "PatchGrid",
    "ResNet50Trunc",
    "SlideInfo",
    "TissueMask",
    "TissueParams",
    "build_encoder",
    "build_timm_encoder",
    "choose_level",
    "clam_patch_coords",
    "clam_patch_grid",
    "clam_segment",
    "config_from_settings",
    "default_weights_path",
    "encoder_identity",
    "encoder_spec",
    "extract_features",
    "find_slides",
    "main",
    "open_slide",
    "patch_grid",
    "patch_score_image",
    "patch_size_level0",
    "plot_attention_heatmap",
    "process_slide",
    "process_slides",
    "read_patches_h5",
    "read_slide_info",
    "resolve_magnification",
    "segment_tissue",
    "slide_tissue_mask",
    "update_dataset_csv",
    "write_patches_h5",
]
