"""Golden tests: official checkpoints load through ``from_official`` and give the official outputs.

Each ``tests/fixtures/official/<case>.json`` was written by running a compared system's
official code (the repository and commit it names; see README.md there) on an
official-format ``state_dict`` with deterministic weights (``synth.py``) and deterministic
inputs. Here the same ``state_dict`` goes through :func:`from_official` and our forward pass
must reproduce the recorded outputs to 1e-5.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from gimplib.models.baselines import CLAM_SB, build_baseline, from_official
from gimplib.models.baselines.official import OFFICIAL_SOURCES, load_official_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = sorted(p.stem for p in FIXTURES.glob("*.json"))
TOL = 1e-5

_spec = importlib.util.spec_from_file_location("official_synth", FIXTURES / "synth.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)


def load_case(case: str) -> dict:
    return json.loads((FIXTURES / f"{case}.json").read_text())


def official_state_dict(doc: dict) -> dict[str, torch.Tensor]:
    """The fixture's official-format state_dict; fails clearly if the generator drifted."""
    sd = synth.fill_state_dict(doc)
    for key, spec in doc["tensors"].items():
        if "sum" in spec:
            assert float(sd[key].sum()) == pytest.approx(spec["sum"], rel=1e-9, abs=1e-9), f"synth.py drifted at {key}"
    return sd


def dtype_of(doc: dict) -> torch.dtype:
    return getattr(torch, doc["dtype"])


def inputs(doc: dict) -> dict[str, torch.Tensor]:
    dt = dtype_of(doc)
    return {name: synth.uniform(tuple(shape), f"{doc['case']}.{name}").to(dt)
            for name, shape in doc["inputs"].items() if isinstance(shape, list)}


def run_ours(doc: dict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our outputs under the names the fixture recorded the official ones."""
    x = inputs(doc)
    system = doc["system"]
    with torch.no_grad():
        if system == "pathomic":
            path = x["path"].abs()  # the official input is a post-ReLU VGG embedding
            return model.fuse(path, x["genes"][None])
        genes = x["genes"][None] if "genes" in x else None
        y = torch.tensor([doc["inputs"]["label"]]) if "label" in doc["inputs"] else None
        out = model(x["feats"][None], genes=genes, y=y)
    if system == "abmil" and "y_prob" in doc["outputs"]:
        return dict(y_prob=torch.sigmoid(out["logits"]), attn=out["attn"])
    if system == "dsmil":
        return dict(logits=out["logits"], logits_max=out["logits_max"], attn_classes=out["attn_classes"][0])
    if system in ("clam_sb", "clam_mb"):
        official_attn = torch.tensor(doc["outputs"]["attn_all"], dtype=out["attn"].dtype)
        pred = int(out["logits"].argmax())
        # our attn is the single branch (SB) or the predicted class's branch (MB)
        return dict(logits=out["logits"], attn_all=out["attn"], instance_loss=out["loss_inst"],
                    _official_attn=official_attn[pred if system == "clam_mb" else 0][None])
    if system == "mcat":
        return dict(logits=out["logits"], coattn=out["coattn"])
    return {k: out[k] for k in doc["outputs"]}


def max_abs_diffs(case: str) -> dict[str, float]:
    doc = load_case(case)
    model = from_official(doc["system"], official_state_dict(doc), dtype=dtype_of(doc), **doc["from_official_options"])
    ours = run_ours(doc, model)
    diffs = {}
    for name, value in doc["outputs"].items():
        official = torch.tensor(value, dtype=torch.float64)
        if name == "attn_all":
            official = ours.pop("_official_attn").double()
        mine = ours[name].double().reshape(official.shape)
        diffs[name] = float((mine - official).abs().max())
    return diffs


def test_every_published_system_has_a_fixture():
    systems = {load_case(c)["system"] for c in CASES}
    assert systems == set(OFFICIAL_SOURCES)


@pytest.mark.parametrize("case", CASES)
def test_matches_the_official_outputs(case):
    diffs = max_abs_diffs(case)
    assert diffs and all(d <= TOL for d in diffs.values()), f"{case}: max abs diff per output {diffs}"


#: fixtures of official default constructors -> the arguments that come from the data, not the model
DEFAULT_CASES = {
    "abmil_porpoise": dict(in_dim=1024, num_classes=4),
    "dsmil": dict(in_dim=64, num_classes=3),
    "clam_sb": dict(in_dim=1024, num_classes=2),
    "clam_mb": dict(in_dim=1024, num_classes=2),
    "transmil": dict(in_dim=1024, num_classes=2),
    "porpoise": dict(in_dim=1024, num_classes=4, num_genes=10),
    "pathomic": dict(in_dim=1024, num_classes=3, num_genes=12),
    "mcat": dict(in_dim=1024, num_classes=4, num_genes=24, group_sizes=(3, 4, 5, 2, 6, 4)),
}


@pytest.mark.parametrize("case", sorted(DEFAULT_CASES))
def test_default_constructor_is_the_official_default(case):
    """Our defaults build exactly the parameter shapes of the official default model."""
    doc = load_case(case)
    loaded = from_official(doc["system"], official_state_dict(doc))
    default = build_baseline(doc["system"], **DEFAULT_CASES[case])
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(default) == shapes(loaded)


def test_loads_a_saved_checkpoint_file():
    """The small Pathomic Fusion fixture also exists as the file the official code would save."""
    doc = load_case("pathomic_small")
    model = from_official("pathomic", FIXTURES / "pathomic_small_state_dict.pt", **doc["from_official_options"])
    ours = run_ours({**doc, "dtype": "float32"}, model)
    for name, value in doc["outputs"].items():
        torch.testing.assert_close(ours[name].double(), torch.tensor(value, dtype=torch.float64), atol=TOL, rtol=0)


def test_unwraps_checkpoint_dicts_and_dataparallel_prefixes():
    doc = load_case("clam_sb")
    sd = official_state_dict(doc)
    wrapped = {"model_state_dict": {k.replace("attention_net.", "attention_net.module."): v for k, v in sd.items()}}
    flat = load_official_state_dict(wrapped)
    assert set(flat) == set(sd)
    assert isinstance(from_official("clam_sb", wrapped), CLAM_SB)


def test_clam_hard_svm_switch_is_exercised_and_optional():
    """The fixture's instance logits switch rows to the hard SVM; without the switch the loss differs."""
    doc = load_case("clam_sb_hard")
    sd = official_state_dict(doc)
    x = inputs(doc)["feats"][None]
    y = torch.tensor([doc["inputs"]["label"]])
    official = doc["outputs"]["instance_loss"]
    with_switch = from_official("clam_sb", sd, dtype=torch.float64)(x, y=y)["loss_inst"].item()
    without = from_official("clam_sb", sd, dtype=torch.float64, svm_hard_switch=False)(x, y=y)["loss_inst"].item()
    assert with_switch == pytest.approx(official, abs=TOL)
    assert abs(without - official) > 10 * TOL


# ---------------------------------------------------------------- refusals


def test_unknown_system_is_a_key_error_listing_the_known():
    with pytest.raises(KeyError, match="known: abmil"):
        from_official("clam_xl", {})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        from_official("abmil", tmp_path / "nope.pt")


def test_a_file_with_more_than_tensors_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": argparse.Namespace(mode="pathomic"), "model_state_dict": {}}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        from_official("pathomic", path)


def test_not_a_state_dict_is_refused():
    with pytest.raises(ValueError, match="expected a state_dict"):
        from_official("dsmil", {"epoch": 3})


def test_unknown_official_keys_are_named():
    sd = official_state_dict(load_case("clam_sb"))
    sd["attention_net.3.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"no counterpart.*attention_net\.3\.extra\.weight"):
        from_official("clam_sb", sd)


def test_missing_official_keys_are_named():
    sd = official_state_dict(load_case("transmil"))
    del sd["layer2.attn.to_qkv.weight"]
    with pytest.raises(ValueError, match=r"lacks.*layer2\.attn\.to_qkv\.weight"):
        from_official("transmil", sd)


def test_shape_mismatches_are_named():
    sd = official_state_dict(load_case("mcat"))
    sd["path_rho.0.weight"] = sd["path_rho.0.weight"][:, :100]
    with pytest.raises(ValueError, match=r"path_pool\.rho\.0\.weight: official \(256, 100\)"):
        from_official("mcat", sd)


def test_another_systems_checkpoint_is_refused():
    sd = official_state_dict(load_case("dsmil"))
    with pytest.raises(ValueError, match="not a github.com/mahmoodlab/CLAM"):
        from_official("clam_sb", sd)


def test_ilse_cnn_is_refused_unless_dropped():
    sd = official_state_dict(load_case("abmil_ilse"))
    with pytest.raises(ValueError, match=r"feature_extractor_part1\.0\.weight.*drop_feature_extractor=True"):
        from_official("abmil", sd)


def test_ungated_clam_is_refused():
    sd = official_state_dict(load_case("clam_sb"))
    sd = {k.replace("attention_a.0", "module.0").replace("attention_c", "module.3"): v
          for k, v in sd.items() if "attention_b" not in k}
    with pytest.raises(ValueError, match="only the gated attention"):
        from_official("clam_sb", sd)


def test_porpoise_concat_fusion_is_refused():
    sd = official_state_dict(load_case("porpoise"))
    sd = {k: v for k, v in sd.items() if not k.startswith("mm.")} | {"mm.0.weight": torch.zeros(256, 512)}
    with pytest.raises(ValueError, match="fusion='concat'"):
        from_official("porpoise", sd)


def test_pathomic_keeps_our_histology_branch_initialised():
    doc = load_case("pathomic")
    model = from_official("pathomic", official_state_dict(doc), in_dim=24, attn_dim=8)
    assert model.path_encoder[0].in_features == 24
    out = model(torch.randn(2, 5, 24), genes=torch.randn(2, doc["inputs"]["genes"][0]))
    assert out["logits"].shape == (2, 3)


@pytest.mark.skipif("GIMPLIB_CLAM_DEMO_CKPT" not in os.environ,
                    reason="set GIMPLIB_CLAM_DEMO_CKPT to CLAM's heatmaps/demo/ckpts/s_0_checkpoint.pt (GPL-3.0, not shipped)")
def test_clam_demo_checkpoint_loads():
    model = from_official("clam_sb", os.environ["GIMPLIB_CLAM_DEMO_CKPT"])
    out = model(torch.randn(1, 50, 1024))
    assert out["logits"].shape == (1, 2) and torch.isfinite(out["logits"]).all()
