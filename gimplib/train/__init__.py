"""Training engine: gene-encoder pretraining, GiMP pretraining, fine-tuning, baselines, k-fold.

Modules: ``engine`` (the generic loop :func:`fit`: AdamW + cosine, accumulation, bf16
autocast on CUDA, exact resume, NaN guard, DDP), ``checkpoint`` (configs, atomic
checkpoints, ``weights_only`` loads), ``common`` (run folders, evaluation), ``tasks``
(gene encoder, baselines, k-fold), ``options`` (:class:`TrainOptions`, what every task
shares), ``pretraining`` (GiMP pretraining, fine-tuning, the
pipeline), ``inference`` (rebuild models, embed cases) and ``cli`` (``gimp-train``).
"""

from gimplib.train.checkpoint import ConfigMismatchError, NonFiniteLossError, load_checkpoint
from gimplib.train.cli import main
from gimplib.train.common import RunResult, load_run
from gimplib.train.engine import FitResult, fit
from gimplib.train.inference import embed, load_gene_transform, load_model
from gimplib.train.options import TrainOptions
from gimplib.train.pretraining import finetune, gimp_pipeline, pretrain_baseline, pretrain_gimp
from gimplib.train.tasks import kfold, train_baseline, train_gene_encoder

__all__ = [
    "ConfigMismatchError",
    "FitResult",
    "NonFiniteLossError",
    "RunResult",
    "TrainOptions",
    "embed",
    "finetune",
    "fit",
    "gimp_pipeline",
    "kfold",
    "load_checkpoint",
    "load_gene_transform",
    "load_model",
    "load_run",
    "main",
    "pretrain_baseline",
    "pretrain_gimp",
    "train_baseline",
    "train_gene_encoder",
]
