"""The build tree's generated pages (gimplib.book.site): provenance and results, from hand-made
run records and metrics files, without executing any notebook."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gimplib.book import site
from gimplib.train.compare import ROWS


def _runs(workdir, stems):
    return {s: dict(status="executed", params="smoke", seconds=1.5, finished="2026-11-28 20:00",
                    data="a **synthetic** cohort", synthetic=True, workdir=str(workdir)) for s in stems}


@pytest.fixture
def build(tmp_path):
    work = tmp_path / "work"
    (work / "05_finetune").mkdir(parents=True)
    # 32 of 32 right: the bootstrap interval degenerates to [1, 1]
    (work / "05_finetune" / "metrics.json").write_text(json.dumps(dict(
        test_accuracy=1.0, test_accuracy_ci_low=1.0, test_accuracy_ci_high=1.0, test_n=32,
        test_auc=1.0, test_auc_ci_low=1.0, test_auc_ci_high=1.0)))
    cmp_dir = work / "07_compare"
    cmp_dir.mkdir()
    records = [("gimp", 0, 0.8125), ("gimp", 1, 0.75), ("abmil", 0, 0.5), ("abmil", 1, 0.5625),
               ("fusion_snn", 0, 0.875), ("fusion_snn", 1, 0.8125)]
    pd.DataFrame([dict(recipe=r, seed=s, fold=None, accuracy=a, auc=a, run="/x") for r, s, a in records]).to_csv(
        cmp_dir / "runs.csv", index=False)
    pd.DataFrame([dict(group="g", system="ABMIL", runs=2, inputs="image", **{"accuracy (paper, TCGA)": "0.7737"}),
                  dict(group="g", system="GiMP", runs=2, inputs="image+genes",
                       **{"accuracy (paper, TCGA)": "0.9947"})]).to_csv(cmp_dir / "table1.csv", index=False)
    # metrics keys in alphabetical order, as save_json writes them
    (cmp_dir / "metrics.json").write_text(json.dumps(dict(
        abmil_accuracy_mean=0.53, abmil_accuracy_sd=0.04, fusion_snn_accuracy_mean=0.84, fusion_snn_accuracy_sd=0.04,
        gimp_accuracy_mean=0.78, gimp_accuracy_sd=0.04, n_test=32), sort_keys=True))
    out = tmp_path / "site"
    stems = ["05_finetune", "07_compare"]
    site.write_pages(out, _runs(work, stems), work, stems, dict(date="today", commit="abc", hardware="cpu"))
    return out / "book"


def test_degenerate_bootstrap_becomes_an_exact_interval(build):
    text = (build / "_results.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 05_finetune"))
    assert "1.000 [0.891, 1.000] exact" in row, row
    assert "1.000 [1.00, 1.00]" not in row.split("|")[2]
    assert "one patient is 3.1 points of accuracy" in text


def test_seeds_listed_and_drawn_in_the_papers_order(build):
    text = (build / "_results.md").read_text()
    assert "| accuracy of each seed | accuracy (paper, TCGA) |" in text
    abmil = next(line for line in text.splitlines() if "| ABMIL |" in line)
    assert "0.500, 0.562" in abmil
    svg = build / "_results_seeds_07_compare.svg"
    assert svg.is_file() and "<svg" in svg.read_text()[:500]
    assert "_results_seeds_07_compare.svg" in text and ":alt:" in text and "**synthetic**" in text
    # systems in the paper's order (Table 1, then Table 2's own rows), not alphabetical
    order = [r.label for r in ROWS]
    drawn = ["ABMIL", "GiMP", "aggregator + SNN"]
    assert sorted(drawn, key=order.index) == drawn


def test_fallback_table_without_csv_is_in_the_papers_order(tmp_path):
    m = dict(gimp_accuracy_mean=0.8, abmil_accuracy_mean=0.5, transmil_accuracy_mean=0.6, zeta_accuracy_mean=0.1)
    blocks = site._headline_tables({"07_compare": m})
    table = next(b for b in blocks if "Systems compared" in b)
    rows = [line.split("|")[1].strip(" `") for line in table.splitlines() if line.startswith("| `")]
    assert rows == ["abmil", "transmil", "gimp", "zeta"]


def test_provenance_page_does_not_link_to_itself_and_has_a_header(build):
    assert "provenance.md" in (build / "_build_note.md").read_text()
    summary = (build / "_build_summary.md").read_text()
    assert "provenance.md" not in summary and "parameter set **smoke**" in summary
    table = (build / "_provenance.md").read_text().splitlines()
    assert table[0] == "| what | this build |"
