"""The benchmarks' reports (issue 14): what the lead reads off `python -m gimplib.bench ...`."""

from __future__ import annotations

import json

from gimplib.bench import io, slide, step

TINY_STEP = (
    "--window-len 40 --in-dim 16 --embed-dim 8 --num-heads 2 --num-landmarks 8 --genes 100 "
    "--gene-embed-dim 8 --warmup 0 --repeats 2 --matmul-size 64 --matmul-seconds 0.05 --device cpu"
)


def test_step_reports_ratio_flops_and_fraction_of_matmul(tmp_path):
    res = step.run(TINY_STEP.split() + ["--profile", str(tmp_path / "profile.txt")])
    json.dumps(res)
    for key in ("gimplib", "reference"):
        r = res[key]
        assert r["flops"] > 0 and len(r["seconds_all"]) == 2
        assert r["achieved_fraction_of_matmul"] > 0
    # the masked-rows decoder and the cut last layer: fewer FLOPs than the full composition
    assert res["gimplib"]["flops"] < res["reference"]["flops"]
    # the Toeplitz products count more than the convolution they compute; only the latter is kept
    g = res["gimplib"]
    assert g["flops_residual_conv_excess"] > 0 and g["flops"] == g["flops_counted"] - g["flops_residual_conv_excess"]
    text = step.summary(res)
    assert "ratio: gimplib / reference" in text and "of matmul" in text and "GFLOP/s fp32" in text
    assert "aten::" in (tmp_path / "profile.txt").read_text()


def test_slide_checks_its_outputs_against_the_path_before():
    res = slide.run("--sizes 40,70 --in-dim 16 --embed-dim 8 --num-heads 2 --num-landmarks 8 --chunk-size 16 --device cpu".split())
    for case in res["cases"]:
        assert case["same_outputs_1e-5"] and case["max_abs_diff_tokens"] <= 1e-5 and case["max_abs_diff_attn"] <= 1e-5
    assert "same to 1e-5" in slide.summary(res)


def test_io_reports_min_median_max_over_runs(tmp_path):
    res = io.run(["--n", "3000", "--dim", "32", "--window", "300", "--repeats", "3", "--windows", "2", "--dir", str(tmp_path)])
    json.dumps(res)
    for name in ("read_bag", "pooled", "h5py"):
        r = res[name]
        assert len(r["ratio_all"]) == 3
        for key in ("whole_s", "window_s", "ratio"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
    assert "read_bag: whole" in io.summary(res)
    assert list(tmp_path.iterdir()) == []


def test_a_fused_attention_counts_the_flops_of_its_products_written_out():
    """The step's FLOPs count what is useful: a fused softmax(Q K^T) V (which the aggregator
    uses) counts its two products and their four gradient products, as the unfused
    composition does, and not the scores its backward recomputes."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 3, s, 8, requires_grad=True) for s in (5, 11, 11))

    def count(attention):
        with FlopCounterMode(display=False, custom_mapping=step.USEFUL_FLOPS) as counter:
            attention().sum().backward()
        return counter.get_total_flops()

    unfused = count(lambda: (q @ k.transpose(-1, -2) * 0.3).softmax(dim=-1) @ v)
    assert unfused == 6 * 2 * (2 * 3) * 5 * 11 * 8
    assert count(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.3)) == unfused


def test_step_under_bf16_autocast_reports_against_the_bf16_matmul():
    res = step.run(TINY_STEP.split() + ["--amp", "bf16", "--repeats", "1"])
    assert res["amp"] == "bf16" and res["matmul_bf16_gflops"] > 0 and "matmul_fp32_gflops" not in res
    assert res["gimplib"]["flops"] > 0 and "GFLOP/s bf16" in step.summary(res)
