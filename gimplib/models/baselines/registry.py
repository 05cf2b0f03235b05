"""The registry of compared systems: one record per system, written beside its class.

A model file registers its system where the class is defined (as timm's ``@register_model``
does)::

    @register_system("abmil", block="pathology", cite="ilse2018abmil",
                     tiny=dict(embed_dim=16, attn_dim=8),
                     widths=lambda embed_dim, **_: dict(embed_dim=embed_dim))
    class ABMIL(nn.Module): ...

Everything else that names the systems is read off :data:`SYSTEMS`: ``BASELINES`` and
:func:`~gimplib.models.baselines.build_baseline`, the comparison's recipes
(:data:`gimplib.train.compare.RECIPES`), the sweep's widths, the tasks that refuse a system of
the wrong block, and the contract tests, which build every record's ``tiny`` configuration.
Registration requires ``tiny``, so a system cannot exist untested.

One vocabulary of blocks, the blocks of the paper's Table 1:

* ``"pathology"``: slides only, no pre-training (ABMIL, DSMIL, CLAM, TransMIL);
* ``"fusion"``: slides + genes trained end to end, no pre-training (PORPOISE, Pathomic
  Fusion, MCAT, GiMP's encoders fused);
* ``"pretraining"``: slides + genes, image-gene pre-training, then GiMP's fine-tuning
  (BioViL-, MGCA-, REFERS-style).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

__all__ = [
    "BLOCKS",
    "SYSTEMS",
    "System",
    "aggregator_widths",
    "canonical_name",
    "get_system",
    "register_system",
    "systems_in",
]

#: block -> its heading in the paper's Table 1.
BLOCKS: dict[str, str] = {
    "pathology": "pathology, no pre-training",
    "fusion": "pathology + genomic, no pre-training",
    "pretraining": "pathology + genomic, pre-training",
}

#: The task of :mod:`gimplib.train` that trains a system of each block.
TRAINERS: dict[str, str] = {"pathology": "train_baseline", "fusion": "train_baseline",
                            "pretraining": "pretrain_baseline"}


def _no_widths(**_: Any) -> dict[str, Any]:
    return {}


def aggregator_widths(*, embed_dim: int, depth: int, num_heads: int, num_landmarks: int) -> dict[str, Any]:
    """The ``widths`` of a system built on GiMP's aggregator: the aggregator's own four."""
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_landmarks=num_landmarks)


@dataclass(frozen=True)
class System:
    """One compared system.

    Attributes:
        name: registry key (lower case, ``_`` between words), e.g. ``"clam_sb"``.
        block: ``"pathology"``, ``"fusion"`` or ``"pretraining"`` (:data:`BLOCKS`).
        constructor: the class (or factory) called with keyword arguments.
        tiny: the smallest constructor arguments that exercise every part (the contract
            tests add ``in_dim``, ``num_classes`` and, for systems that read genes, ``num_genes``).
        cite: the BibTeX key of its paper in ``book/references.bib``.
        widths: ``widths(embed_dim=, depth=, num_heads=, num_landmarks=) -> kwargs``: the
            constructor arguments at the comparison sweep's aggregator widths (default: none,
            the system keeps its own defaults).
        recipes: the comparison recipes this system provides, recipe -> options (default:
            one recipe named after the system, no options). GiMP's fused encoders provide
            two, one per gene encoder.
        published: a published system, trained at the sweep's ``baseline_lr``; False for
            GiMP's own encoders fused (trained at GiMP's ``lr``).
    """

    name: str
    block: str
    constructor: Callable[..., Any]
    tiny: Mapping[str, Any]
    cite: str
    widths: Callable[..., dict[str, Any]] = _no_widths
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    published: bool = True

    @property
    def trainer(self) -> str:
        """The task that trains it: ``"train_baseline"`` (end to end with labels) or
        ``"pretrain_baseline"`` (pre-training; then :func:`~gimplib.train.finetune`)."""
        return TRAINERS[self.block]

    @property
    def reads_genes(self) -> bool:
        return self.block != "pathology"

    def build(self, **kwargs: Any) -> Any:
        return self.constructor(**kwargs)


#: name -> record, in registration order.
SYSTEMS: dict[str, System] = {}

T = TypeVar("T")


def canonical_name(name: str) -> str:
    """``"CLAM-SB"`` -> ``"clam_sb"`` (case-insensitive; ``-`` and ``_`` are interchangeable)."""
    return name.lower().replace("-", "_")


def register_system(name: str, *, block: str, tiny: Mapping[str, Any], cite: str,
                    widths: Callable[..., dict[str, Any]] = _no_widths,
                    recipes: Mapping[str, Mapping[str, Any]] | None = None,
                    published: bool = True) -> Callable[[T], T]:
    """Class decorator: add a :class:`System` record to :data:`SYSTEMS` (arguments as its attributes).

    Raises:
        ValueError: the name is taken or not canonical, the block is unknown, or ``tiny`` or
            ``cite`` is missing.
    """
    if canonical_name(name) != name:
        raise ValueError(f"system name {name!r} must be lower case with '_' (e.g. {canonical_name(name)!r})")
    if name in SYSTEMS:
        raise ValueError(f"system {name!r} is already registered (by {SYSTEMS[name].constructor.__qualname__})")
    if block not in BLOCKS:
        raise ValueError(f"system {name!r}: unknown block {block!r}; known: {sorted(BLOCKS)}")
    if not isinstance(tiny, Mapping):
        raise ValueError(f"system {name!r}: tiny must be a dict of constructor arguments for the tests")
    if not cite:
        raise ValueError(f"system {name!r}: cite must be the BibTeX key of its paper in book/references.bib")

    def add(constructor: T) -> T:
        SYSTEMS[name] = System(name=name, block=block, constructor=constructor, tiny=dict(tiny), cite=cite,
                               widths=widths, recipes=dict(recipes) if recipes is not None else {name: {}},
                               published=published)
        return constructor

    return add


def get_system(name: str) -> System:
    """The record of ``name`` (case-insensitive; ``-`` = ``_``).

    Raises:
        KeyError: naming the unknown system and listing the known ones.
    """
    key = canonical_name(name)
    if key not in SYSTEMS:
        raise KeyError(f"unknown baseline {name!r}; known: {', '.join(sorted(SYSTEMS))}")
    return SYSTEMS[key]


def systems_in(*blocks: str) -> list[str]:
    """Names of the registered systems in ``blocks``, in registration order."""
    return [n for n, s in SYSTEMS.items() if s.block in blocks]
