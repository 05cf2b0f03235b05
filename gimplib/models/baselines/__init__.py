"""The systems GiMP is compared against (Tables 1 and 2 and Fig. 2 of Jin et al. 2023).

One module per system; each module's docstring cites the original paper and states what was
adapted, and registers the system with :func:`~gimplib.models.baselines.registry.register_system`
(block, tiny test configuration, citation, widths, recipes): :data:`SYSTEMS` is the one
table of systems, and :data:`BASELINES` and :func:`build_baseline` are views of it. The
blocks (one vocabulary, the blocks of the paper's Table 1):

* ``"pathology"``: slide-only MIL classifiers (ABMIL, DSMIL, CLAM-SB, CLAM-MB, TransMIL).
* ``"fusion"``: pathology + genomics trained end to end, no pretraining (PORPOISE,
  Pathomic Fusion, MCAT, and GiMP's own encoders fused without pretraining).
* ``"pretraining"``: image-gene pretraining adapted from image-text methods (BioViL-, MGCA-,
  REFERS-style) on GiMP's own encoders; they expose
  ``pretrain_step(feats, mask, genes, y=None) -> dict(loss, ...)`` and
  ``build_classifier(num_classes=...) -> GiMPClassifier`` (the same fine-tuning model as GiMP).

Classifiers share one contract::

    forward(feats (b, n, D), mask (b, n) bool | None = None, genes (b, G) | None = None,
            y (b,) | None = None) -> dict(logits (b, C), loss_aux scalar, attn (b, n) | None)

and are trained by minimising ``cross_entropy(logits, y) + loss_aux``.

The eight published systems load their official repositories' checkpoints through
:func:`from_official` (``gimplib.models.baselines.official``).
"""

from __future__ import annotations

from torch import nn

from gimplib.models.baselines._pretrain import ImageGenePretrainer
from gimplib.models.baselines.abmil import ABMIL
from gimplib.models.baselines.biovil import BioViLStyle
from gimplib.models.baselines.clam import CLAM_MB, CLAM_SB, smooth_top1_svm_loss
from gimplib.models.baselines.dsmil import DSMIL
from gimplib.models.baselines.gimp_fusion import GiMPFusion
from gimplib.models.baselines.mcat import MCAT
from gimplib.models.baselines.mgca import MGCAStyle, sinkhorn_knopp
from gimplib.models.baselines.official import OFFICIAL_SOURCES, from_official
from gimplib.models.baselines.pathomic import GatedBilinearFusion, PathomicFusion
from gimplib.models.baselines.porpoise import PORPOISE
from gimplib.models.baselines.refers import REFERSStyle
from gimplib.models.baselines.registry import (
    BLOCKS,
    SYSTEMS,
    System,
    canonical_name,
    get_system,
    register_system,
    systems_in,
)
from gimplib.models.baselines.transmil import TransMIL

__all__ = [
    "ABMIL",
    "BASELINES",
    "BLOCKS",
    "BioViLStyle",
    "CLAM_MB",
    "CLAM_SB",
    "DSMIL",
    "GatedBilinearFusion",
    "GiMPFusion",
    "ImageGenePretrainer",
    "MCAT",
    "MGCAStyle",
    "OFFICIAL_SOURCES",
    "PORPOISE",
    "PathomicFusion",
    "REFERSStyle",
    "SYSTEMS",
    "System",
    "TransMIL",
    "build_baseline",
    "canonical_name",
    "from_official",
    "get_system",
    "register_system",
    "sinkhorn_knopp",
    "smooth_top1_svm_loss",
    "systems_in",
]

#: name -> class, a view of :data:`SYSTEMS`; build with ``build_baseline(name, **cfg)``.
BASELINES: dict[str, type[nn.Module]] = {name: system.constructor for name, system in SYSTEMS.items()}


def build_baseline(name: str, **cfg) -> nn.Module:
    """Build the system registered as ``name`` with keyword arguments ``cfg``.

    Args:
        name: a key of :data:`SYSTEMS` (case-insensitive; "-" and "_" are interchangeable).
        **cfg: the system's constructor arguments (``in_dim``, ``num_classes``, ...).

    Raises:
        KeyError: naming the unknown system and listing the known ones.
    """
    return get_system(name).build(**cfg)
