"""gimplib: GiMP (Jin et al., MICCAI 2023) and the systems it is compared against.

Sub-packages:
    gimplib.data     cohort folders (CLAM layout), bags, gene tables, splits, datasets,
                     the synthetic TCGA-like cohort and whole-slide tiling/feature extraction
    gimplib.models   GroupMSA, SNN, the Nystrom patch aggregator, GiMP and the baselines
    gimplib.losses   triplet, masked-L1 reconstruction and contrastive losses
    gimplib.train    training engine (supervised, pretraining, fine-tuning, k-fold)
    gimplib.metrics  classification metrics with bootstrap confidence intervals
    gimplib.plots    figures used by the book
"""

__version__ = "0.1.0"

from gimplib.utils import DataError, default, exists, get_device, seed_everything

__all__ = ["DataError", "default", "exists", "get_device", "seed_everything", "__version__"]
