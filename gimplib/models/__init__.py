"""Models: GroupMSA and SNN gene encoders, the Nystrom patch aggregator, GiMP, heads."""

from gimplib.models.any_modality import AnyModalityClassifier
from gimplib.models.aggregator import AggregatorOutput, NystromLayer, PatchAggregator, nystrom_attention_chunked
from gimplib.models.gene_encoders import GENE_ENCODERS, build_gene_encoder
from gimplib.models.gimp import GiMP, GiMPClassifier, aggregator_state_dict, random_patch_mask
from gimplib.models.groupmsa import GroupMSA, TransformerBlock
from gimplib.models.heads import MLPHead
from gimplib.models.snn import SNN
from gimplib.models import baselines  # noqa: F401  the compared systems (gimplib.models.baselines)

__all__: list[str] = [
    "AggregatorOutput",
    "AnyModalityClassifier",
    "GENE_ENCODERS",
    "GiMP",
    "GiMPClassifier",
    "GroupMSA",
    "MLPHead",
    "NystromLayer",
    "PatchAggregator",
    "SNN",
    "TransformerBlock",
    "aggregator_state_dict",
    "build_gene_encoder",
    "nystrom_attention_chunked",
    "random_patch_mask",
]
