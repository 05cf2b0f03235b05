"""TrainOptions: the options every task shares, given as ``options=`` or as keywords."""

from __future__ import annotations

import dataclasses

import pytest

from gimplib.train import finetune, pretrain_baseline, pretrain_gimp, train_baseline, train_gene_encoder
from gimplib.train.options import CONFIG_FIELDS, TrainOptions
from gimplib.utils import load_json


def test_each_task_fills_in_its_own_schedule_defaults():
    expected = {train_gene_encoder: (50, 32), pretrain_gimp: (100, 8), pretrain_baseline: (100, 8),
                finetune: (70, 1), train_baseline: (70, 1)}
    for task, (epochs, batch) in expected.items():
        defaults = dict(zip(("num_epochs", "batch_size"), expected[task]))
        opts = TrainOptions.for_task(task, None, {}, **defaults)
        assert (opts.num_epochs, opts.batch_size) == (epochs, batch)
    # a value given in options (or as a keyword) wins over the task's default
    assert TrainOptions.for_task(finetune, TrainOptions(num_epochs=5), {}, num_epochs=70, batch_size=1).num_epochs == 5


def test_a_keyword_overrides_the_same_field_of_options():
    base = TrainOptions(lr=1e-3, seed=3, device="cpu")
    opts = TrainOptions.for_task(finetune, base, {"lr": 2e-3}, num_epochs=70, batch_size=1)
    assert (opts.lr, opts.seed, opts.device) == (2e-3, 3, "cpu")
    assert base.lr == 1e-3  # options are not changed in place


def test_an_unknown_keyword_names_the_task_and_the_known_ones():
    with pytest.raises(TypeError, match=r"finetune\(\) got unexpected keyword argument\(s\) \['learning_rate'\]") as err:
        TrainOptions.for_task(finetune, None, {"learning_rate": 1e-3}, num_epochs=70, batch_size=1)
    assert "pretrained_ckpt" in str(err.value) and "'lr'" in str(err.value)  # its own and the shared names
    with pytest.raises(TypeError, match="options must be a TrainOptions, got dict"):
        TrainOptions.for_task(finetune, {"lr": 1e-3}, {}, num_epochs=70, batch_size=1)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_epochs", "three", r"num_epochs='three': expected an integer >= 1"),
    ("lr", 0, r"lr=0: expected a number > 0"),
    ("grad_clip", -1.0, r"grad_clip=-1.0: expected a number >= 0"),
    ("deterministic", "yes", r"deterministic='yes': expected true or false"),
])
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainOptions.for_task(finetune, None, {field: value}, num_epochs=70, batch_size=1)


def test_the_config_records_the_training_fields_only():
    opts = TrainOptions(num_epochs=3, batch_size=2, device="cpu", progress=False)
    assert list(opts.config()) == list(CONFIG_FIELDS)
    assert not {"device", "num_workers", "overwrite", "progress", "callbacks"} & set(opts.config())
    assert {f.name for f in dataclasses.fields(TrainOptions)} >= set(CONFIG_FIELDS)


def test_options_and_keywords_train_the_same_run(smoke, tmp_path):
    cohort, split = smoke
    agg = dict(embed_dim=16, depth=1, num_heads=2, num_landmarks=4, dropout=0.0)
    by_kw = finetune(cohort, split, out_dir=tmp_path / "kw", aggregator_kwargs=agg, num_epochs=1, lr=1e-3,
                     device="cpu", progress=False, n_boot=20, seed=1)
    opts = TrainOptions(num_epochs=1, lr=1e-3, device="cpu", progress=False, n_boot=20, seed=1)
    by_opts = finetune(cohort, split, out_dir=tmp_path / "opts", aggregator_kwargs=agg, options=opts)
    assert by_kw.metrics == by_opts.metrics
    assert load_json(tmp_path / "kw" / "config.json") == load_json(tmp_path / "opts" / "config.json")
