"""Data layer: cohort folders in CLAM's layout, bags, gene tables, splits, datasets."""

from gimplib.data.bags import Bag, bag_info, read_bag, write_bag, write_bag_pt

__all__ = ["Bag", "bag_info", "read_bag", "write_bag", "write_bag_pt"]
