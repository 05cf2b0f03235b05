"""The gene encoders by name: ``"groupmsa"`` (:class:`GroupMSA`) and ``"snn"`` (:class:`SNN`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from gimplib.models.groupmsa import GroupMSA
from gimplib.models.snn import SNN

__all__ = ["GENE_ENCODERS", "build_gene_encoder"]

#: name -> class; both take ``num_genes`` and expose ``embed_dim`` (the size of CLS_ge).
GENE_ENCODERS: dict[str, type[nn.Module]] = {"groupmsa": GroupMSA, "snn": SNN}


def build_gene_encoder(encoder: str, **kwargs: Any) -> nn.Module:
    """Build the gene encoder named ``encoder`` with constructor arguments ``kwargs``.

    Raises:
        ValueError: naming the unknown encoder and listing the known ones.
    """
    if encoder not in GENE_ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(GENE_ENCODERS)}, got {encoder!r}")
    return GENE_ENCODERS[encoder](**kwargs)
