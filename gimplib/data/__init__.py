"""Data layer: cohort folders in CLAM's layout, bags, gene tables, splits, datasets."""

from gimplib.data.bags import Bag, BagReader, bag_cache_info, bag_info, read_bag, set_bag_cache, write_bag, write_bag_pt
from gimplib.data.cohort import Cohort, load_cohort, normalize_slide_id
from gimplib.data.datasets import BagDataset, GeneDataset, WindowDataset, collate_bags
from gimplib.data.genes import (
    GeneTransform,
    is_tcga_barcode,
    patient_id,
    read_gdc_expression,
    read_gene_table,
    strip_version,
    write_gene_table,
)
from gimplib.data.splits import (
    check_disjoint,
    decide_split,
    kfold_splits,
    read_clam_split,
    train_val_test_split,
    write_clam_split,
)
from gimplib.data.synthetic import PRESETS, generate_cohort
from gimplib.data.wsi import ExtractConfig, plot_attention_heatmap, process_slide, process_slides

__all__ = [
    "PRESETS",
    "Bag",
    "BagDataset",
    "BagReader",
    "Cohort",
    "ExtractConfig",
    "GeneDataset",
    "GeneTransform",
    "WindowDataset",
    "bag_cache_info",
    "bag_info",
    "check_disjoint",
    "decide_split",
    "collate_bags",
    "generate_cohort",
    "is_tcga_barcode",
    "kfold_splits",
    "load_cohort",
    "normalize_slide_id",
    "patient_id",
    "plot_attention_heatmap",
    "process_slide",
    "process_slides",
    "read_bag",
    "read_clam_split",
    "read_gdc_expression",
    "read_gene_table",
    "set_bag_cache",
    "strip_version",
    "train_val_test_split",
    "write_bag",
    "write_bag_pt",
    "write_clam_split",
    "write_gene_table",
]
