"""Load the official repositories' checkpoints into our re-implementations.

``from_official(name, state_dict_or_path, **options)`` reads a ``state_dict`` saved by a
compared system's official code, renames its keys to ours, builds our model with the widths
the checkpoint implies, and loads it strictly. Anything that does not fit is refused with a
``ValueError`` naming the offending keys: official keys with no counterpart here, our keys
the checkpoint lacks, and shape mismatches.

The official classes read, by ``name``:

* ``abmil``: Ilse et al.'s ``GatedAttention`` (AMLab-Amsterdam/AttentionDeepMIL; its MNIST
  CNN is refused unless ``drop_feature_extractor=True``, and its 800-d output is then our
  input) or PORPOISE's ``PorpoiseAMIL`` (mahmoodlab/PORPOISE).
* ``dsmil``: ``MILNet(FCLayer, BClassifier)`` (binli123/dsmil-wsi).
* ``clam_sb``, ``clam_mb``: ``CLAM_SB``, ``CLAM_MB`` with gated attention (mahmoodlab/CLAM).
* ``transmil``: ``TransMIL`` (szc19990412/TransMIL).
* ``porpoise``: ``PorpoiseMMF`` with ``fusion="bilinear"`` (mahmoodlab/PORPOISE). The gate
  switches are not stored in a checkpoint: pass ``gate_path`` / ``gate_omic`` if they were off.
* ``pathomic``: ``PathomicNet`` (mahmoodlab/PathomicFusion). The SNN, the fusion and the head
  are loaded; the attention-MIL histology branch is ours and keeps its initialisation
  (:meth:`~gimplib.models.baselines.pathomic.PathomicFusion.fuse` runs the official part on
  given embeddings). Gate switches as for PORPOISE.
* ``mcat``: ``MCAT_Surv`` with ``fusion="concat"`` (mahmoodlab/MCAT); the gene groups'
  sizes come from the checkpoint.

Keys the official models carry but never use in their forward pass (the instance loss's
``labels`` buffer, Pathomic Fusion's unimodal survival head and output range) are dropped;
``DataParallel``'s ``module.`` segments are removed. The returned model is in eval mode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from gimplib.models.baselines.abmil import ABMIL
from gimplib.models.baselines.clam import CLAM_MB, CLAM_SB
from gimplib.models.baselines.dsmil import DSMIL
from gimplib.models.baselines.mcat import MCAT
from gimplib.models.baselines.pathomic import PathomicFusion
from gimplib.models.baselines.porpoise import PORPOISE
from gimplib.models.baselines.transmil import TransMIL

__all__ = ["OFFICIAL_SOURCES", "from_official", "load_official_state_dict"]

#: name -> the official repository whose checkpoints :func:`from_official` reads.
OFFICIAL_SOURCES: dict[str, str] = {
    "abmil": "github.com/AMLab-Amsterdam/AttentionDeepMIL (GatedAttention); github.com/mahmoodlab/PORPOISE (PorpoiseAMIL)",
    "dsmil": "github.com/binli123/dsmil-wsi (MILNet)",
    "clam_sb": "github.com/mahmoodlab/CLAM (CLAM_SB)",
    "clam_mb": "github.com/mahmoodlab/CLAM (CLAM_MB)",
    "transmil": "github.com/szc19990412/TransMIL (TransMIL)",
    "porpoise": "github.com/mahmoodlab/PORPOISE (PorpoiseMMF, fusion='bilinear')",
    "pathomic": "github.com/mahmoodlab/PathomicFusion (PathomicNet)",
    "mcat": "github.com/mahmoodlab/MCAT (MCAT_Surv, fusion='concat')",
}

Rules = list[tuple[str, str]]


def load_official_state_dict(state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike) -> dict[str, Tensor]:
    """A checkpoint as a flat ``{key: tensor}`` dict on the CPU, without ``module.`` segments.

    Args:
        state_dict_or_path: a ``state_dict``, or the path of a file ``torch.save`` wrote (a
            ``state_dict``, or a dict holding one under ``model_state_dict``, ``state_dict``
            or ``model``, as Pathomic Fusion's checkpoints do).

    Raises:
        FileNotFoundError: naming the path when it does not exist.
        ValueError: naming the file when it holds no ``state_dict``.
    """
    where = "the given state_dict"
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        where = os.fspath(state_dict_or_path)
        if not os.path.exists(where):
            raise FileNotFoundError(f"official checkpoint {where} does not exist")
        try:
            state_dict_or_path = torch.load(where, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError and friends: more than tensors in the file
            raise ValueError(
                f"{where}: holds more than tensors and containers of tensors ({type(err).__name__}); Pathomic Fusion's "
                "checkpoints, for one, pickle their options. If you trust the file, load it with "
                "torch.load(path, weights_only=False) and pass its 'model_state_dict'"
            ) from err
    sd = state_dict_or_path
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{where}: expected a state_dict (a mapping of parameter names to tensors)")
    return {re.sub(r"(^|\.)module\.", r"\1", k): v.detach().cpu() for k, v in sd.items()}


def _rename(system: str, sd: Mapping[str, Tensor], rules: Rules, drop: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Apply the first matching ``(regex, replacement)`` of ``rules`` to each key; refuse the unmatched."""
    out, unknown = {}, []
    for key, value in sd.items():
        if any(re.fullmatch(pattern, key) for pattern in drop):
            continue
        for pattern, repl in rules:
            if m := re.fullmatch(pattern, key):
                out[m.expand(repl)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"from_official({system!r}): official keys with no counterpart in our model: {sorted(unknown)}")
    return out


def _load(system: str, model: nn.Module, mapped: Mapping[str, Tensor], *, partial: tuple[str, ...] = ()) -> nn.Module:
    """Load ``mapped`` into ``model`` strictly (except our keys under ``partial``); name every misfit."""
    ours = model.state_dict()
    missing = sorted(k for k in ours if k not in mapped and not k.startswith(partial))
    extra = sorted(k for k in mapped if k not in ours)
    shapes = sorted(f"{k}: official {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
                    for k, v in mapped.items() if k in ours and v.shape != ours[k].shape)
    problems = []
    if missing:
        problems.append(f"our keys the checkpoint lacks: {missing}")
    if extra:
        problems.append(f"mapped keys our model does not have: {extra}")
    if shapes:
        problems.append(f"shape mismatches: {shapes}")
    if problems:
        raise ValueError(f"from_official({system!r}): " + "; ".join(problems))
    model.load_state_dict({**ours, **{k: v.to(ours[k].dtype) for k, v in mapped.items()}})
    return model.eval()


def _need(system: str, sd: Mapping[str, Tensor], *keys: str) -> None:
    absent = [k for k in keys if k not in sd]
    if absent:
        raise ValueError(f"from_official({system!r}): not a {OFFICIAL_SOURCES[system]} checkpoint; "
                         f"missing {absent}; it has {sorted(sd)[:12]}{' ...' if len(sd) > 12 else ''}")


def _gated_attention_rules(src: str, dst: str) -> Rules:
    return [
        (rf"{src}\.attention_a\.0\.(weight|bias)", rf"{dst}.V.0.\1"),
        (rf"{src}\.attention_b\.0\.(weight|bias)", rf"{dst}.U.0.\1"),
        (rf"{src}\.attention_c\.(weight|bias)", rf"{dst}.w.\1"),
    ]


# ---------------------------------------------------------------- pathology


def _abmil(sd: dict[str, Tensor], *, drop_feature_extractor: bool = False, **options) -> nn.Module:
    if "attention_V.0.weight" in sd:  # Ilse et al.'s GatedAttention
        cnn = sorted(k for k in sd if k.startswith("feature_extractor_part1."))
        if cnn and not drop_feature_extractor:
            raise ValueError(f"from_official('abmil'): {cnn} are Ilse et al.'s MNIST CNN, which our ABMIL does not have "
                             "(it takes patch features); pass drop_feature_extractor=True to load the rest and feed "
                             "the CNN's 800-d output as feats")
        _need("abmil", sd, "feature_extractor_part2.0.weight", "attention_w.weight", "classifier.0.weight")
        rules = [
            (r"feature_extractor_part2\.0\.(weight|bias)", r"encoder.0.\1"),
            (r"attention_V\.0\.(weight|bias)", r"attention.V.0.\1"),
            (r"attention_U\.0\.(weight|bias)", r"attention.U.0.\1"),
            (r"attention_w\.(weight|bias)", r"attention.w.\1"),
            (r"classifier\.0\.(weight|bias)", r"classifier.\1"),
        ]
        mapped = _rename("abmil", sd, rules, drop=(r"feature_extractor_part1\..*",))
        cfg = dict(dropout=0.0, attn_dropout=0.0)
    else:  # PORPOISE's PorpoiseAMIL (CLAM's Attn_Net_Gated on a Linear + ReLU + Dropout)
        _need("abmil", sd, "attention_net.0.weight", "attention_net.3.attention_c.weight", "classifier.weight")
        rules = [(r"attention_net\.0\.(weight|bias)", r"encoder.0.\1"), *_gated_attention_rules(r"attention_net\.3", "attention"),
                 (r"classifier\.(weight|bias)", r"classifier.\1")]
        mapped = _rename("abmil", sd, rules)
        cfg = dict(dropout=0.25, attn_dropout=0.25)
    enc, att = mapped["encoder.0.weight"], mapped["attention.V.0.weight"]
    cfg.update(in_dim=enc.shape[1], embed_dim=enc.shape[0], attn_dim=att.shape[0], num_classes=mapped["classifier.weight"].shape[0])
    return ABMIL(**{**cfg, **options}), mapped, ()


def _dsmil(sd: dict[str, Tensor], **options) -> nn.Module:
    _need("dsmil", sd, "b_classifier.fcc.weight")
    rules = [
        (r"i_classifier\.fc(?:\.0)?\.(weight|bias)", r"instance_classifier.\1"),
        (r"b_classifier\.q\.(0|2)\.(weight|bias)", r"query.\1.\2"),
        (r"b_classifier\.q\.(weight|bias)", r"query.\1"),
        (r"b_classifier\.v\.1\.(weight|bias)", r"value.1.\1"),
        (r"b_classifier\.fcc\.(weight|bias)", r"bag_classifier.\1"),
    ]
    mapped = _rename("dsmil", sd, rules)
    nonlinear = "query.0.weight" in mapped
    q = mapped["query.2.weight" if nonlinear else "query.weight"]
    fcc = mapped["bag_classifier.weight"]
    cfg = dict(in_dim=fcc.shape[2], num_classes=fcc.shape[0], query_dim=q.shape[0], nonlinear_query=nonlinear,
               value_projection="value.1.weight" in mapped)
    return DSMIL(**{**cfg, **options}), mapped, ()


def _clam(system: str, sd: dict[str, Tensor], **options) -> nn.Module:
    _need(system, sd, "attention_net.0.weight")
    if "attention_net.3.attention_a.0.weight" not in sd:
        raise ValueError(f"from_official({system!r}): only the gated attention (gate=True, CLAM's default) is "
                         f"supported; attention keys found: {sorted(k for k in sd if k.startswith('attention_net.3'))}")
    multi = system == "clam_mb"
    head = [(r"classifiers\.(\d+)\.(weight|bias)", r"classifiers.\1.\2")] if multi else [(r"classifiers\.(weight|bias)", r"classifier.\1")]
    rules = [(r"attention_net\.0\.(weight|bias)", r"encoder.0.\1"), *_gated_attention_rules(r"attention_net\.3", "attention"),
             *head, (r"instance_classifiers\.(\d+)\.(weight|bias)", r"instance_classifiers.\1.\2")]
    mapped = _rename(system, sd, rules, drop=(r"instance_loss_fn\..*",))
    enc = mapped["encoder.0.weight"]
    num_classes = sum(1 for k in mapped if re.fullmatch(r"instance_classifiers\.\d+\.weight", k))
    cfg = dict(in_dim=enc.shape[1], embed_dim=enc.shape[0], attn_dim=mapped["attention.V.0.weight"].shape[0], num_classes=num_classes)
    return (CLAM_MB if multi else CLAM_SB)(**{**cfg, **options}), mapped, ()


def _transmil(sd: dict[str, Tensor], **options) -> nn.Module:
    _need("transmil", sd, "_fc1.0.weight", "cls_token", "_fc2.weight")
    rules = [
        (r"_fc1\.0\.(weight|bias)", r"encoder.0.\1"),
        (r"cls_token", r"cls_token"),
        (r"pos_layer\.proj\.(weight|bias)", r"ppeg.convs.0.\1"),
        (r"pos_layer\.proj1\.(weight|bias)", r"ppeg.convs.1.\1"),
        (r"pos_layer\.proj2\.(weight|bias)", r"ppeg.convs.2.\1"),
        (r"(layer[12]\.(?:norm|attn)\..+)", r"\1"),
        (r"norm\.(weight|bias)", r"norm.\1"),
        (r"_fc2\.(weight|bias)", r"classifier.\1"),
    ]
    mapped = _rename("transmil", sd, rules)
    enc = mapped["encoder.0.weight"]
    cfg = dict(in_dim=enc.shape[1], embed_dim=enc.shape[0], num_classes=mapped["classifier.weight"].shape[0])
    return TransMIL(**{**cfg, **options}), mapped, ()


# ---------------------------------------------------------------- fusion


def _fusion_rules(src: str, gated: dict[int, bool], project_ungated: bool) -> tuple[Rules, tuple[str, ...]]:
    """Rules for the official ``BilinearFusion`` under ``src`` onto our ``fusion``; keys an ungated branch never uses."""
    rules, drop = [], []
    for i in (1, 2):
        if gated[i] or project_ungated:
            rules.append((rf"{src}\.linear_h{i}\.0\.(weight|bias)", rf"fusion.unimodal{i}.proj.0.\1"))
        else:
            drop.append(rf"{src}\.linear_h{i}\..*")
        if gated[i]:
            rules.append((rf"{src}\.linear_z{i}(?:\.0)?\.(weight|bias)", rf"fusion.unimodal{i}.gate.\1"))
        else:
            drop.append(rf"{src}\.linear_z{i}\..*")
        rules.append((rf"{src}\.linear_o{i}\.0\.(weight|bias)", rf"fusion.unimodal{i}.out.0.\1"))
    rules += [(rf"{src}\.encoder([12])\.0\.(weight|bias)", r"fusion.encoder\1.0.\2")]
    return rules, tuple(drop)


def _fusion_cfg(system: str, sd: Mapping[str, Tensor], src: str, porpoise: bool) -> dict:
    """Widths and switches of the official ``BilinearFusion`` under ``src``, read from its shapes."""
    _need(system, sd, f"{src}.linear_h1.0.weight", f"{src}.linear_o1.0.weight", f"{src}.encoder1.0.weight", f"{src}.encoder2.0.weight")
    h1, h2 = sd[f"{src}.linear_h1.0.weight"], sd[f"{src}.linear_h2.0.weight"]
    (d1, dim1), (d2, dim2) = h1.shape, h2.shape
    enc1, enc2 = sd[f"{src}.encoder1.0.weight"], sd[f"{src}.encoder2.0.weight"]
    skip_dim = enc2.shape[1] - enc1.shape[0]
    skip_if_on = dim1 + dim2 if porpoise else d1 + d2 + 2
    if skip_dim not in (0, skip_if_on):
        raise ValueError(f"from_official({system!r}): {src}.encoder2.0.weight has {enc2.shape[1]} inputs; expected "
                         f"{enc1.shape[0]} (no skip) or {enc1.shape[0] + skip_if_on} (skip)")
    return dict(dim1=dim1, dim2=dim2, scale1=dim1 // d1, scale2=dim2 // d2, hidden=enc1.shape[0], fused_dim=enc2.shape[0],
                skip=skip_dim > 0, use_bilinear=f"{src}.linear_z1.weight" in sd and sd[f"{src}.linear_z1.weight"].ndim == 3)


def _porpoise(sd: dict[str, Tensor], *, gate_path: bool = True, gate_omic: bool = True, **options) -> nn.Module:
    linear = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"attention_net\.(\d+)\.weight", k)))
    if "mm.0.weight" in sd:
        raise ValueError("from_official('porpoise'): this is a PorpoiseMMF with fusion='concat' (keys mm.0, mm.2); "
                         "only fusion='bilinear' (PORPOISE's) is supported")
    _need("porpoise", sd, "rho.0.weight", "fc_omic.0.0.weight", "classifier_mm.weight")
    if linear not in ([0], [1]):
        raise ValueError(f"from_official('porpoise'): expected one Linear at attention_net.0 or attention_net.1 "
                         f"(with input dropout); found {[f'attention_net.{i}.weight' for i in linear]}")
    first = linear[0]
    fusion_rules, drop = _fusion_rules(r"mm", {1: gate_path, 2: gate_omic}, project_ungated=True)
    rules = [
        (rf"attention_net\.{first}\.(weight|bias)", r"path_encoder.0.\1"),
        *_gated_attention_rules(rf"attention_net\.{first + 3}", "path_attention"),
        (r"rho\.0\.(weight|bias)", r"path_rho.0.\1"),
        (r"fc_omic\.(\d+)\.0\.(weight|bias)", r"omic_encoder.net.\1.0.\2"),
        *fusion_rules,
        (r"classifier_mm\.(weight|bias)", r"classifier.\1"),
    ]
    mapped = _rename("porpoise", sd, rules, drop=drop)
    f = _fusion_cfg("porpoise", sd, "mm", porpoise=True)
    enc, rho = mapped["path_encoder.0.weight"], mapped["path_rho.0.weight"]
    omic = [mapped[k].shape[0] for k in sorted(k for k in mapped if re.fullmatch(r"omic_encoder\.net\.\d+\.0\.weight", k))]
    if f["scale1"] != f["scale2"] or f["hidden"] != rho.shape[0] or f["fused_dim"] != rho.shape[0]:
        raise ValueError(f"from_official('porpoise'): fusion widths {f} do not fit one bag width {rho.shape[0]} and one scale")
    cfg = dict(in_dim=enc.shape[1], embed_dim=enc.shape[0], bag_dim=rho.shape[0], omic_hidden=tuple(omic),
               num_genes=mapped["omic_encoder.net.0.0.weight"].shape[1], num_classes=mapped["classifier.weight"].shape[0],
               scale=f["scale1"], skip=f["skip"], use_bilinear=f["use_bilinear"], gate_path=gate_path, gate_omic=gate_omic,
               dropinput=0.1 if first == 1 else 0.0)
    return PORPOISE(**{**cfg, **options}), mapped, ()


def _pathomic(sd: dict[str, Tensor], *, gate_path: bool = True, gate_omic: bool = True, **options) -> nn.Module:
    _need("pathomic", sd, "omic_net.encoder.0.0.weight", "classifier.0.weight")
    fusion_rules, drop = _fusion_rules(r"fusion", {1: gate_path, 2: gate_omic}, project_ungated=False)
    rules = [
        (r"omic_net\.encoder\.(\d+)\.0\.(weight|bias)", r"omic_encoder.net.\1.0.\2"),
        *fusion_rules,
        (r"classifier\.0\.(weight|bias)", r"classifier.\1"),
    ]
    unused = (r"omic_net\.classifier\..*", r"(omic_net\.)?output_(range|shift)")
    mapped = _rename("pathomic", sd, rules, drop=drop + unused)
    f = _fusion_cfg("pathomic", sd, "fusion", porpoise=False)
    omic = [mapped[k].shape[0] for k in sorted(k for k in mapped if re.fullmatch(r"omic_encoder\.net\.\d+\.0\.weight", k))]
    if f["hidden"] != f["fused_dim"]:
        raise ValueError(f"from_official('pathomic'): encoder1 ({f['hidden']}) and encoder2 ({f['fused_dim']}) widths differ")
    cfg = dict(path_dim=f["dim1"], omic_hidden=tuple(omic), fused_dim=f["fused_dim"], scale_path=f["scale1"],
               scale_omic=f["scale2"], use_bilinear=f["use_bilinear"], skip=f["skip"], gate_path=gate_path,
               gate_omic=gate_omic, num_genes=mapped["omic_encoder.net.0.0.weight"].shape[1],
               num_classes=mapped["classifier.weight"].shape[0])
    return PathomicFusion(**{**cfg, **options}), mapped, ("path_encoder.", "path_attention.")


def _mcat(sd: dict[str, Tensor], **options) -> nn.Module:
    if "mm.linear_h1.0.weight" in sd:
        raise ValueError("from_official('mcat'): this is an MCAT_Surv with fusion='bilinear' (keys mm.linear_*); "
                         "only fusion='concat' (MCAT's default) is supported")
    _need("mcat", sd, "wsi_net.0.weight", "coattn.in_proj_weight", "classifier.weight")
    rules = [(r"wsi_net\.0\.(weight|bias)", r"path_encoder.0.\1"),
             (r"sig_networks\.(\d+)\.(\d+)\.0\.(weight|bias)", r"gene_encoders.\1.net.\2.0.\3"),
             (r"coattn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", r"coattn.\1")]
    for side in ("path", "omic"):
        rules += [(rf"{side}_transformer\.(layers\..+)", rf"{side}_pool.transformer.\1"),
                  *_gated_attention_rules(rf"{side}_attention_head", f"{side}_pool.attention"),
                  (rf"{side}_rho\.0\.(weight|bias)", rf"{side}_pool.rho.0.\1")]
    rules += [(r"mm\.([02])\.(weight|bias)", r"fusion.\1.\2"), (r"classifier\.(weight|bias)", r"classifier.\1")]
    mapped = _rename("mcat", sd, rules)
    groups = sorted({int(m.group(1)) for k in mapped if (m := re.fullmatch(r"gene_encoders\.(\d+)\.net\.0\.0\.weight", k))})
    sizes = tuple(mapped[f"gene_encoders.{g}.net.0.0.weight"].shape[1] for g in groups)
    depth = len({m.group(1) for k in mapped if (m := re.fullmatch(r"path_pool\.transformer\.layers\.(\d+)\..*", k))})
    enc = mapped["path_encoder.0.weight"]
    cfg = dict(in_dim=enc.shape[1], embed_dim=enc.shape[0], num_genes=sum(sizes), group_sizes=sizes, depth=depth,
               num_classes=mapped["classifier.weight"].shape[0])
    return MCAT(**{**cfg, **options}), mapped, ()


_LOADERS: dict[str, Callable[..., tuple[nn.Module, dict[str, Tensor], tuple[str, ...]]]] = {
    "abmil": _abmil,
    "dsmil": _dsmil,
    "clam_sb": lambda sd, **o: _clam("clam_sb", sd, **o),
    "clam_mb": lambda sd, **o: _clam("clam_mb", sd, **o),
    "transmil": _transmil,
    "porpoise": _porpoise,
    "pathomic": _pathomic,
    "mcat": _mcat,
}


def from_official(
    name: str, state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike, *, dtype: torch.dtype | None = None, **options
) -> nn.Module:
    """Build our ``name`` model from an official checkpoint (see the module docstring for the sources).

    Args:
        name: ``abmil``, ``dsmil``, ``clam_sb``, ``clam_mb``, ``transmil``, ``porpoise``,
            ``pathomic`` or ``mcat``.
        state_dict_or_path: the official model's ``state_dict``, or a file holding it.
        dtype: the model's parameter dtype (default: as built, float32); the checkpoint's
            tensors are cast to it.
        **options: constructor options of our model that a checkpoint does not record
            (dropout rates, ``num_heads``, ``k_sample``, ``subtyping``, ``in_dim`` of Pathomic
            Fusion's histology branch, ...), and the official switches it does not record:
            ``gate_path`` / ``gate_omic`` (PORPOISE, Pathomic Fusion; default on, as the
            official defaults) and ``drop_feature_extractor`` (Ilse et al.'s ABMIL).

    Returns:
        our model, in eval mode, with the official weights.

    Raises:
        KeyError: naming ``name`` when it is not one of the eight systems.
        ValueError: naming the official keys that do not fit (unknown, missing or misshapen).
    """
    key = name.lower().replace("-", "_")
    if key not in _LOADERS:
        raise KeyError(f"from_official: no official loader for {name!r}; known: {', '.join(sorted(_LOADERS))}")
    model, mapped, partial = _LOADERS[key](load_official_state_dict(state_dict_or_path), **options)
    if dtype is not None:
        model.to(dtype)
    return _load(key, model, mapped, partial=partial)
