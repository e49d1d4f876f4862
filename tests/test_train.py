import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import fastmlp
from fastmlp.data import DeviceDataset, FashionMNIST
from fastmlp.monitor import AnomalyError
from fastmlp.train import ConfigError, Trainer, TrainConfig, build_scheduler
from fastmlp.train.cli import check_overfit, lr_find, main
from fastmlp.train.config import DEFAULT_YAML
from fastmlp.train.engine import CHECKPOINT, early_stop, new_run_dir
from test_data import augment_reference, real_data_dir

REPO = Path(__file__).resolve().parent.parent




def synthetic(n_train=512, n_test=256, seed=0):
    """A learnable stand-in for Fashion-MNIST: noisy copies of ten class prototypes."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 784, generator=g) * 0.3

    def split(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return DeviceDataset(torch.randn(n, 784, generator=g) + protos[y], y)

    return FashionMNIST(split(n_train), None, split(n_test), 0.0, 1.0)


def synthetic_on(device, **kw):
    """synthetic() with its splits on `device` (as load_data puts Fashion-MNIST there)."""
    d = synthetic(**kw)
    on = lambda split: DeviceDataset(split.x.to(device), split.y.to(device))  # noqa: E731
    return FashionMNIST(on(d.train), None, on(d.test), d.mean, d.std)


def cfg_small(tmp_path, **kw):
    base = dict(widths=[784, 32, 10], epochs=2, batch_size=64, impl="torch", out_dir=str(tmp_path / "runs"),
                progress="off", plots=False, monitor_every=4, log_every=3, device="cpu", scheduler="none", lr=5e-3)
    base.update(kw)
    return TrainConfig(**base)


# ---- configuration -----------------------------------------------------------------------------
def test_recipe_yaml_equals_dataclass_defaults():
    assert yaml.safe_load(DEFAULT_YAML.read_text()) == TrainConfig().to_dict()


@pytest.mark.parametrize("bad, match", [
    ({"lr": -1.0}, "'lr'"), ({"lr": 0.0}, "'lr'"), ({"dropout": 1.0}, "'dropout'"),
    ({"activation": "tanh"}, "'activation'"), ({"widths": [784, 10, 3]}, "'widths'"),
    ({"batch_size": 0}, "'batch_size'"), ({"betas": [0.9]}, "'betas'"), ({"amp": "fp8"}, "'amp'"),
    ({"nesterov": True, "optimizer": "adamw"}, "'nesterov'"), ({"epochs": "ten"}, "'epochs'"),
    ({"learning_rate": 0.1}, "unknown option.*learning_rate"), ({"device": "tpu"}, "'device'"),
    ({"device": "cuda:x"}, "'device' must be auto, cpu, cuda or cuda:N"), ({"name": "a/b"}, "'name'.*path separator"),
    ({"min_lr": 0.01, "lr": 0.001}, r"'min_lr' \(0.01\) must not exceed 'lr' \(0.001\)"),
    ({"early_stopping": -1}, "'early_stopping' must be an int >= 0"),
    ({"seed": -1}, r"'seed' must be an int in \[0, 2\*\*32 - 1\]"),
    ({"seed": 2**32}, r"'seed' must be an int in \[0, 2\*\*32 - 1\]"),   # (the shuffle's seed overflowed int64)
    ({"augment_shift": 9}, r"'augment_shift' must be an int in \[0, 8\]"),
    ({"augment_shift": -1}, r"'augment_shift' must be an int in \[0, 8\]"),
    ({"ema": 1.0}, r"'ema' must be a number in \[0, 1\)"),
    ({"early_stopping": 3}, r"'early_stopping' \(3\) needs a validation split.*--val-split"),
])
def test_bad_config_values_name_the_option(bad, match):
    d = TrainConfig().to_dict()
    d.update(bad)
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(d)


def test_cli_precedence_and_errors(tmp_path, capsys):
    from fastmlp.train.cli import build_parser, resolve_config

    y = tmp_path / "c.yaml"
    y.write_text("lr: 1\nepochs: 3\nwidths: [784, 100, 10]\n")
    cfg, _ = resolve_config(build_parser().parse_args(["train", "--config", str(y), "--epochs", "4", "--no-plots"]))
    assert (cfg.lr, cfg.epochs, cfg.widths, cfg.plots, cfg.optimizer) == (1.0, 4, [784, 100, 10], False, "adamw")
    assert main(["train", "--scheduler", "linear"]) == 2
    assert "'scheduler' must be one of" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err
    y.write_text("- a list\n")
    assert main(["train", "--config", str(y)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_yaml_numeric_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as a string: numeric strings count as numbers, exact ones as ints."""
    from fastmlp.train.cli import build_parser, resolve_config

    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-3\nmin_lr: '5E-6'\nbatch_size: '128'\nepochs: 2.0\nbetas: [9e-1, 0.999]\nwidths: [784, '64', 10]\n")
    cfg, _ = resolve_config(build_parser().parse_args(["train", "--config", str(y)]))
    assert (cfg.lr, cfg.min_lr, cfg.batch_size, cfg.epochs, cfg.betas, cfg.widths) == \
        (1e-3, 5e-6, 128, 2, [0.9, 0.999], [784, 64, 10])
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.lr, float)
    for text, match in (("lr: fast", "option 'lr' must be a number, got 'fast'"),
                        ("batch_size: '1.5'", "option 'batch_size' must be an int, got '1.5'"),
                        ("lr: .nan", "'lr' must be a number > 0"), ("lr: 'inf'", "'lr' must be a number > 0")):
        y.write_text(text + "\n")
        with pytest.raises(ConfigError, match=match):
            resolve_config(build_parser().parse_args(["train", "--config", str(y)]))


def test_validation_messages_are_consistent(tmp_path, capsys):
    """One range per option (lr -1 and lr 0 give the same message); float lists show X in --help."""
    msgs = []
    for lr in (-1.0, 0.0):
        with pytest.raises(ConfigError) as e:
            TrainConfig(lr=lr).validate()
        msgs.append(str(e.value).rsplit(",", 1)[0])
    assert msgs[0] == msgs[1] == "config option 'lr' must be a number > 0"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--betas X [X ...]" in out and "--widths N [N ...]" in out


def test_widths_and_betas_take_tuples(tmp_path):
    cfg = cfg_small(tmp_path, widths=(784, 16, 10), betas=(0.8, 0.99), optimizer="adam", epochs=1)
    assert (cfg.validate().widths, cfg.betas) == ([784, 16, 10], [0.8, 0.99])
    assert dataclasses.replace(cfg, widths=(784, 8, 10)).widths == [784, 8, 10]
    s = Trainer(cfg, data=synthetic()).fit()  # config.yaml is plain YAML (safe_dump has no tuples)
    assert yaml.safe_load((Path(s["run_dir"]) / "config.yaml").read_text())["widths"] == [784, 16, 10]


def test_val_split_that_leaves_no_training_images_names_val_split(tmp_path):
    import warnings

    from fastmlp.train.engine import load_data
    from test_data import write_dataset

    write_dataset(tmp_path, n_train=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch warning about the std() of no images on the way
        with pytest.raises(ConfigError, match=r"'val_split' \(0.99\) holds out all 20 training images for validation, "
                                              "leaving none to train on; use a smaller --val-split"):
            load_data(TrainConfig(data_dir=str(tmp_path), val_split=0.99), torch.device("cpu"))
    assert len(load_data(TrainConfig(data_dir=str(tmp_path), val_split=0.9), torch.device("cpu")).train) == 2


def test_train_warns_about_options_without_effect(tmp_path, capsys):
    """Options set away from the recipe that the configuration does not use get one warning each
    (the data is missing here, so each run stops right after the warnings, with exit status 1)."""
    common = ["--data-dir", str(tmp_path / "no-data"), "--out-dir", str(tmp_path / "runs")]
    assert main(["train", *common]) == 1
    assert "warning" not in capsys.readouterr().err  # the recipe as it is
    assert main(["train", *common, "--optimizer", "adam", "--momentum", "0.5", "--min-lr", "1e-5",
                 "--warmup-epochs", "2", "--betas", "0.9", "0.99"]) == 1
    err = capsys.readouterr().err
    assert "warning: --momentum has no effect (only sgd uses it; --optimizer is adam); ignored" in err
    assert "--min-lr has no effect (only the cosine and warmup_cosine schedules use it; --scheduler is onecycle)" in err
    assert "--warmup-epochs has no effect (only the warmup_cosine schedule uses it" in err
    assert "--betas" not in err  # adam uses them (the first is cycled only when changed: see below)
    assert main(["train", *common, "--optimizer", "sgd", "--betas", "0.8", "0.99", "--scheduler", "cosine",
                 "--min-lr", "1e-5", "--pct-start", "0.5", "--no-cycle-momentum", "--momentum", "0.9"]) == 1
    err = capsys.readouterr().err
    assert "--betas has no effect (only adam and adamw use it; --optimizer is sgd)" in err
    assert "--no-cycle-momentum, --pct-start have no effect (only the onecycle schedule uses it" in err
    assert "--min-lr" not in err and "--momentum" not in err
    assert main(["train", *common, "--optimizer", "sgd", "--nesterov", "--momentum", "0.9", "--scheduler", "step",
                 "--gamma", "0.5", "--min-lr", "1e-5"]) == 1
    err = capsys.readouterr().err
    assert "--min-lr has no effect" in err and "--gamma" not in err and "--nesterov" not in err


def test_train_subset_larger_than_the_data_is_an_error(tmp_path):
    from fastmlp.train.engine import load_data
    from test_data import write_dataset

    write_dataset(tmp_path, n_train=20)
    assert len(load_data(TrainConfig(data_dir=str(tmp_path), train_subset=20), torch.device("cpu")).train) == 20
    with pytest.raises(ConfigError, match=r"'train_subset' \(30\) is larger than the training split, which has 20 images"):
        load_data(TrainConfig(data_dir=str(tmp_path), train_subset=30), torch.device("cpu"))
    with pytest.raises(ConfigError, match="which has 16 images once --val-split 0.2 holds out 4"):
        load_data(TrainConfig(data_dir=str(tmp_path), train_subset=18, val_split=0.2), torch.device("cpu"))


def test_data_dir_one_level_off_names_the_right_one(tmp_path, capsys):
    from test_data import write_dataset

    raw = write_dataset(tmp_path / "data", n_train=8)
    for given in (raw, raw.parent, tmp_path):  # .../FashionMNIST/raw, .../FashionMNIST, the folder above
        assert main(["train", "--data-dir", str(given), "--out-dir", str(tmp_path / "runs"), "--impl", "torch"]) == 1
        err = capsys.readouterr().err
        assert f"The four files are in {raw}: use --data-dir {tmp_path / 'data'} " in err and "Traceback" not in err


def test_too_long_warmup_is_a_config_error_before_the_data_loads(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"'warmup_epochs' \(5\) must be shorter than the run, 'epochs' \(2\)"):
        TrainConfig(scheduler="warmup_cosine", warmup_epochs=5.0, epochs=2).validate()
    TrainConfig(scheduler="cosine", warmup_epochs=5.0, epochs=2).validate()  # only warmup_cosine warms up
    # A missing --data-dir would be exit status 1: the config error comes first.
    assert main(["train", "--scheduler", "warmup_cosine", "--warmup-epochs", "5", "--epochs", "2",
                 "--data-dir", str(tmp_path / "no-data"), "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "--warmup-epochs" in err and "'epochs' (2)" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    # Shorter than the run in epochs, but rounded to every step of a 1-step run: still a ConfigError.
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ConfigError, match="warmup_epochs.*1 step.*per epoch"):
        build_scheduler(TrainConfig(scheduler="warmup_cosine", warmup_epochs=0.9, epochs=1), torch.optim.SGD([p], lr=0.1), 1)


def test_run_folders_are_never_reused(tmp_path):
    a, b = new_run_dir(tmp_path, "x"), new_run_dir(tmp_path, "x")
    assert a != b and a.is_dir() and b.is_dir()


# ---- schedulers --------------------------------------------------------------------------------
def _lrs(cfg, spe):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    s = build_scheduler(cfg, opt, spe)
    out = []
    for _ in range(cfg.epochs * spe):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out, opt


def test_step_and_cosine_schedulers_match_closed_form():
    spe = 10
    lrs, _ = _lrs(TrainConfig(scheduler="step", lr=0.1, step_size=2.0, gamma=0.5, epochs=5), spe)
    assert lrs == pytest.approx([0.1 * 0.5 ** (s // 20) for s in range(50)], rel=1e-12)
    lrs, _ = _lrs(TrainConfig(scheduler="cosine", lr=0.1, min_lr=0.001, epochs=5), spe)
    exp = [0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * s / 50)) / 2 for s in range(50)]
    assert lrs == pytest.approx(exp, rel=1e-9)


def test_warmup_cosine_matches_torch_sequential():
    cfg = TrainConfig(scheduler="warmup_cosine", lr=0.02, warmup_epochs=1.5, min_lr=1e-4, epochs=4)
    spe = 8
    ours, _ = _lrs(cfg, spe)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    S = torch.optim.lr_scheduler
    warm = 12
    ref = S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warm),
                               S.CosineAnnealingLR(opt, T_max=32 - warm, eta_min=1e-4)], milestones=[warm])
    theirs = []
    for _ in range(32):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert max(ours) == pytest.approx(0.02)
    # --warmup-epochs 0: no warmup step, the cosine from the first step.
    ours, _ = _lrs(TrainConfig(scheduler="warmup_cosine", lr=0.02, warmup_epochs=0.0, min_lr=1e-4, epochs=4), spe)
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    ref, theirs = S.CosineAnnealingLR(opt, T_max=32, eta_min=1e-4), []
    for _ in range(32):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours[0] == 0.02 and ours == pytest.approx(theirs, rel=1e-9)


def test_onecycle_matches_torch_and_peaks_at_lr():
    cfg = TrainConfig(scheduler="onecycle", lr=2e-3, pct_start=0.25, epochs=3)
    ours, opt = _lrs(cfg, 20)
    p = torch.nn.Parameter(torch.zeros(1))
    o2 = torch.optim.AdamW([p], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(o2, max_lr=2e-3, total_steps=60, pct_start=0.25)
    theirs = []
    for _ in range(60):
        theirs.append(o2.param_groups[0]["lr"])
        o2.step()
        ref.step()
    assert ours == theirs
    assert max(ours) == pytest.approx(2e-3) and ours.index(max(ours)) == 14
    assert ours[0] == pytest.approx(2e-3 / 25)


def _momenta(cfg, steps=20):
    """The momentum (sgd) or beta1 (adam, adamw) of each of the optimizer's steps under cfg's schedule."""
    from fastmlp.train.engine import build_optimizer

    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    s = build_scheduler(cfg, opt, steps // cfg.epochs)
    out = []
    for _ in range(steps):
        g = opt.param_groups[0]
        out.append(g["momentum"] if cfg.optimizer == "sgd" else g["betas"][0])
        opt.step()
        s.step()
    return out


def test_onecycle_cycles_momentum_only_when_asked(tmp_path, capsys):
    base = dict(scheduler="onecycle", epochs=2, impl="torch")
    # The recipe (cycle_momentum true) is torch's OneCycleLR: beta1 0.95 -> 0.85 -> 0.95.
    m = _momenta(TrainConfig(**base))
    assert m[0] == pytest.approx(0.95) and min(m) == pytest.approx(0.85) and m[-1] > 0.94
    # --no-cycle-momentum keeps --momentum / --betas; sgd with momentum 0 never gets any.
    assert set(_momenta(TrainConfig(**base, betas=[0.5, 0.999], cycle_momentum=False))) == {0.5}
    assert set(_momenta(TrainConfig(**base, optimizer="sgd", momentum=0.7, cycle_momentum=False))) == {0.7}
    assert set(_momenta(TrainConfig(**base, optimizer="sgd", momentum=0.0))) == {0.0}
    assert set(_momenta(TrainConfig(**dict(base, impl="fastmlp"), optimizer="sgd", momentum=0.7,
                                    cycle_momentum=False))) == {0.7}
    # A changed value that the cycling overrides gets a warning naming it and the way out.
    from fastmlp.train.cli import warn_train_options

    err = io.StringIO()
    assert warn_train_options(TrainConfig(optimizer="sgd", momentum=0.5), err) == ["momentum"]
    msg = err.getvalue()
    assert "--momentum 0.5 is overridden: the onecycle schedule cycles the momentum 0.95 -> 0.85 -> 0.95" in msg
    assert "give --no-cycle-momentum to keep --momentum 0.5 constant" in msg
    err = io.StringIO()
    assert warn_train_options(TrainConfig(betas=[0.8, 0.999]), err) == ["betas"]
    assert "the first of --betas (0.8) is overridden" in err.getvalue() and "--no-cycle-momentum" in err.getvalue()
    for quiet in (TrainConfig(), TrainConfig(optimizer="sgd", momentum=0.0), TrainConfig(betas=[0.9, 0.99]),
                  TrainConfig(betas=[0.8, 0.999], cycle_momentum=False)):
        err = io.StringIO()
        assert warn_train_options(quiet, err) == [] and err.getvalue() == ""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--cycle-momentum, --no-cycle-momentum" in out and "Never for sgd with --momentum 0" in out


def test_cycle_momentum_changes_results_so_resume_keeps_it(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--no-cycle-momentum"]) == 2
    assert "drop --cycle-momentum" in capsys.readouterr().err
    # A checkpoint written before the option existed resumes with it on (what those runs did).
    data = synthetic()
    t = Trainer(cfg_small(tmp_path, epochs=2, scheduler="onecycle", optimizer="sgd", momentum=0.5), data=data)
    _dying(t, 9)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    ck = torch.load(t.run_dir / CHECKPOINT, weights_only=False)
    del ck["config"]["cycle_momentum"]
    torch.save(ck, t.run_dir / CHECKPOINT)
    r = Trainer.resume(t.run_dir, data=data)
    assert r.cfg.cycle_momentum is True and r.scheduler.cycle_momentum
    assert r.fit()["status"] == "completed"


# ---- engine ------------------------------------------------------------------------------------
def test_accumulation_equals_one_big_batch(tmp_path):
    data = synthetic()
    x, y = data.train.x[:256], data.train.y[:256]
    grads = []
    for bs, k in ((256, 1), (64, 4)):
        t = Trainer(cfg_small(tmp_path, widths=[784, 48, 32, 10], dropout=0.0, batch_size=bs, accum_steps=k), data=data)
        loss = t._forward_backward(x, y)
        grads.append(([p.grad.clone() for p in t.model.parameters()], loss))
    (g1, l1), (g4, l4) = grads
    torch.testing.assert_close(l4, l1, rtol=1e-6, atol=1e-7)
    for a, b in zip(g4, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_accumulation_runs_see_the_same_batches(tmp_path):
    data = synthetic()
    a = Trainer(cfg_small(tmp_path, dropout=0.0, batch_size=128, accum_steps=1, epochs=1, optimizer="sgd", scheduler="none",
                          lr=0.05, label_smoothing=0.0), data=data).fit()
    b = Trainer(cfg_small(tmp_path, dropout=0.0, batch_size=32, accum_steps=4, epochs=1, optimizer="sgd", scheduler="none",
                          lr=0.05, label_smoothing=0.0), data=data).fit()
    assert a["steps"] == b["steps"] == 4
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4)


def test_run_folder_contents(tmp_path):
    cfg = cfg_small(tmp_path, plots=True, val_split=0.0)
    s = Trainer(cfg, data=synthetic()).fit()
    d = Path(s["run_dir"])
    assert {"config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", CHECKPOINT, "loss.png", "accuracy.png",
            "lr.png", "grad_norms.png", "layers.png"} <= {p.name for p in d.iterdir()}
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 17))  # 512 / 64 = 8 steps x 2 epochs
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and "grad_norm" in r for r in recs)
    assert [r["step"] for r in recs if "0.linear/grad_norm" in r] == [1, 5, 9, 13]  # monitor_every=4
    csv_lines = (d / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("epoch,global_step,train_loss")
    assert yaml.safe_load((d / "config.yaml").read_text()) == cfg.to_dict()
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["final_test_acc"] > 0.5
    assert s["history"][1]["train_loss"] < s["history"][0]["train_loss"]


def test_train_accuracy_val_loss_and_best_checkpoint(tmp_path):
    d = synthetic(n_train=768)
    data = FashionMNIST(DeviceDataset(d.train.x[:512], d.train.y[:512]), DeviceDataset(d.train.x[512:], d.train.y[512:]),
                        d.test, 0.0, 1.0)
    t = Trainer(cfg_small(tmp_path, epochs=4, dropout=0.0, plots=True), data=data)
    s = t.fit()
    h = s["history"]
    assert all(0.0 <= r["train_acc"] <= 1.0 and r["val_loss"] > 0 for r in h)
    assert h[-1]["train_acc"] > h[0]["train_acc"] and h[-1]["train_acc"] > 0.5
    assert (h[-1]["val_acc"], h[-1]["val_loss"]) == pytest.approx(t.evaluate(data.val))  # the model as it ended
    header = (Path(s["run_dir"]) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_acc", "val_loss", "val_acc"} <= set(header)
    best_row = max(h, key=lambda r: r["val_acc"])  # the first of equals
    assert (s["best_val_acc"], s["best_epoch"], s["best_epoch_test_acc"]) == (
        best_row["val_acc"], best_row["epoch"], best_row["test_acc"])
    best = torch.load(s["best_checkpoint"], weights_only=True)
    assert best["epoch"] == best_row["epoch"] and best["val_acc"] == best_row["val_acc"]
    t.model.load_state_dict(best["model"])  # the weights of that epoch: they give its validation accuracy
    assert t.evaluate(data.val)[0] == pytest.approx(best_row["val_acc"])
    # Without a validation split nothing is chosen (choosing on the test set would flatter it).
    s2 = Trainer(cfg_small(tmp_path, epochs=1), data=synthetic()).fit()
    assert s2["best_val_acc"] is None and s2["best_epoch"] is None and s2["best_checkpoint"] is None
    assert not (Path(s2["run_dir"]) / "best.pt").exists()


def test_augmentation_feeds_shifted_and_mirrored_images(tmp_path):
    d = synthetic()
    data = FashionMNIST(d.train, None, d.test, 0.25, 2.0)  # as if normalised with mean 0.25, std 2
    t = Trainer(cfg_small(tmp_path, epochs=1, augment_shift=1, augment_flip=True), data=data)
    seen, orig = [], t.train_step
    t.train_step = lambda xb, yb, **k: (seen.append((xb.clone(), yb.clone())), orig(xb, yb, **k))[1]
    t.fit()
    src = data.train.x.index_select(0, data.train.permutation(t.cfg.seed, 0)[:64])
    xb, yb = seen[0]
    assert torch.equal(yb, data.train.y.index_select(0, data.train.permutation(t.cfg.seed, 0)[:64]))
    kinds = set()
    for i in range(64):
        # Each image is one shift by at most 1 pixel, maybe mirrored, of its own source, filled with
        # the normalised black pixel (0 - mean) / std.
        kind = [(dy, dx, m) for dy in (-1, 0, 1) for dx in (-1, 0, 1) for m in (False, True)
                if torch.equal(xb[i].view(28, 28), augment_reference(src[i].view(28, 28), dy, dx, m, -0.125))]
        assert len(kind) == 1
        kinds.add(kind[0])
    assert len(kinds) > 6


def test_early_stop_rule():
    h = [{"epoch": e, "val_acc": v} for e, v in enumerate([0.5, 0.7, 0.7, 0.6, 0.8, 0.8, 0.8], start=1)]
    assert early_stop(h, 0) is None
    # The best is the first of equals (epoch 2): patience 2 ends the run after epoch 4.
    assert early_stop(h, 2) == {"epoch": 4, "best_epoch": 2, "best_val_acc": 0.7, "patience": 2}
    assert early_stop(h, 3) is None  # epoch 5 improves on epoch 2 within 3 epochs; 5 + 3 is past the history
    assert early_stop(h, 1)["epoch"] == 3
    assert early_stop([{"epoch": 1, "val_acc": None}, {"epoch": 2, "val_acc": None}], 1) is None


def two_way_split(n_train=512, n_val=256):
    d = synthetic(n_train=n_train + n_val)
    return FashionMNIST(DeviceDataset(d.train.x[:n_train], d.train.y[:n_train]),
                        DeviceDataset(d.train.x[n_train:], d.train.y[n_train:]), d.test, 0.0, 1.0)


def test_given_data_must_agree_with_the_data_options(tmp_path):
    # Trainer(data=...) and run_sweep(data=...) train on the data as given: a train_subset or
    # val_split it contradicts is refused (config.yaml would misreport the run), before any folder.
    from fastmlp.train import run_sweep

    d = synthetic()   # 512 training images, no validation split
    with pytest.raises(ConfigError, match=r"'train_subset' \(100\) does not match the given data, whose training "
                                          r"split holds 512 images"):
        Trainer(cfg_small(tmp_path, train_subset=100), data=d)
    with pytest.raises(ConfigError, match=r"'val_split' \(0.1\) asks for a validation split, which the given data "
                                          r"does not have"):
        Trainer(cfg_small(tmp_path, val_split=0.1), data=d)
    with pytest.raises(ConfigError, match=r"'train_subset' \(200\) does not match"):
        run_sweep(cfg_small(tmp_path), {"train_subset": [512, 200]}, data=d)
    assert not (tmp_path / "runs").exists()
    # The options as a dict, as run_sweep takes them.
    s = Trainer(cfg_small(tmp_path, epochs=1, train_subset=512).to_dict(), data=d).fit()
    assert s["status"] == "completed"


def test_early_stopping_stops_resumes_and_is_complete(tmp_path, capsys):
    """A model that cannot improve (lr 1e-30: the weights do not move) stops `patience` epochs after
    its first; the summary, best.pt and a resume agree on where it stopped."""
    data = two_way_split()
    cfg = cfg_small(tmp_path, epochs=10, early_stopping=2, val_split=0.25, optimizer="sgd", momentum=0.0, lr=1e-30,
                    dropout=0.0, weight_decay=0.0)
    s = Trainer(cfg, data=data).fit()
    run = Path(s["run_dir"])
    assert [r["epoch"] for r in s["history"]] == [1, 2, 3] and s["epochs"] == 3 and s["status"] == "completed"
    assert s["early_stopped"] == {"epoch": 3, "best_epoch": 1, "best_val_acc": s["history"][0]["val_acc"],
                                  "patience": 2}
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1
    out = capsys.readouterr().out
    assert "early stopping: the validation accuracy has not improved for 2 epochs (best" in out and "at epoch 1" in out
    assert "epoch   4/10" not in out
    # A resume trains nothing more and leaves the folder as it is.
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--progress", "off"]) == 0
    assert f"run {run} is already complete: stopped early after epoch 3 (step 24)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # Killed after the stopping epoch's checkpoint, before its summary: the resume writes the summary only.
    (run / "summary.json").unlink()
    r = Trainer.resume(run, data=data)
    s2 = r.fit()
    assert f"{run} stopped early after epoch 3; writing its summary" in capsys.readouterr().out
    assert s2["early_stopped"] == s["early_stopped"] and s2["history"] == s["history"] and r.global_step == 24
    # Without a plateau it trains every epoch; an improving run is never stopped by a long patience.
    s3 = Trainer(dataclasses.replace(cfg, lr=5e-3, epochs=3, early_stopping=5), data=data).fit()
    assert s3["epochs"] == 3 and s3["early_stopped"] is None


def test_early_stopping_mid_run_resume_stops_at_the_same_epoch(tmp_path):
    data = two_way_split()
    cfg = cfg_small(tmp_path, epochs=10, early_stopping=1, val_split=0.25, lr=0.3, optimizer="sgd", momentum=0.0,
                    dropout=0.0)
    full = Trainer(dataclasses.replace(cfg, name="full"), data=data).fit()
    assert full["early_stopped"] is not None and full["epochs"] < 10
    part = Trainer(dataclasses.replace(cfg, name="part"), data=data)
    orig, calls = part.train_step, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 10:  # in epoch 2
            raise KeyboardInterrupt
        return orig(*a, **k)

    part.train_step = dying
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    s = Trainer.resume(part.run_dir, data=data).fit()
    assert s["early_stopped"] == full["early_stopped"] and s["history"] == [
        {**r, "seconds": h["seconds"], "samples_per_s": h["samples_per_s"]} for r, h in zip(full["history"], s["history"])]


@pytest.mark.parametrize("extra", [{}, {"augment_shift": 2, "augment_flip": True}, {"norm": "batch"}, {"norm": "layer"}],
                         ids=["plain", "augment", "batchnorm", "layernorm"])
@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_in_process_resume_is_bitwise_identical(tmp_path, device, impl, extra):
    data = synthetic_on(device)
    full = Trainer(cfg_small(tmp_path, epochs=3, name="full", device=device, impl=impl, **extra), data=data).fit()
    part = Trainer(cfg_small(tmp_path, epochs=3, name="part", checkpoint_every=5, device=device, impl=impl, **extra),
                   data=data)
    orig_step = part.train_step
    calls = {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 13:  # mid-epoch 2, three steps after the step-10 checkpoint
            raise KeyboardInterrupt
        return orig_step(*a, **k)

    part.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = Trainer.resume(part.run_dir, overrides={"progress": "off"}, data=data)
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (1, 2, 10)
    s = resumed.fit()
    la = [json.loads(l)["loss"] for l in (Path(full["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 24
    assert [h["test_acc"] for h in full["history"]] == [h["test_acc"] for h in s["history"]]
    # The epoch's training accuracy counts predictions from before the interruption too.
    assert [h["train_acc"] for h in full["history"]] == [h["train_acc"] for h in s["history"]]


def test_anomaly_guard_stops_names_layer_and_keeps_checkpoint(tmp_path):
    data = synthetic()
    t = Trainer(cfg_small(tmp_path, epochs=3, checkpoint_every=5, widths=[784, 32, 16, 10], plots=True), data=data)
    calls = {"n": 0}

    def poison(mod, args):
        calls["n"] += mod.training  # evaluation forwards do not count
        if calls["n"] == 12:  # the forward of step 12
            with torch.no_grad():
                mod.weight[0, 0] = float("nan")

    t.model[1].linear.register_forward_pre_hook(poison)
    with pytest.raises(AnomalyError) as e:
        t.fit()
    assert e.value.step == 12 and e.value.layer == "1.linear"  # 1-based, as in metrics.jsonl
    assert "step 12 (epoch 2, batch 4)" in str(e.value) and "'1.linear'" in str(e.value) and CHECKPOINT in str(e.value)
    ck = torch.load(t.run_dir / CHECKPOINT, weights_only=False)
    assert ck["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary["status"] == "anomaly" and summary["layer"] == "1.linear" and summary["step"] == 12
    assert summary["checkpoint"]["step"] == 10
    # The loss curve up to the NaN is the plot a user wants.
    assert {"loss.png", "lr.png"} <= set(summary["plots"]) and (t.run_dir / "loss.png").stat().st_size > 1000


def test_anomaly_of_a_diverging_loss_blames_the_lr_and_says_how_to_go_on(tmp_path):
    """A loss that grows by orders of magnitude until it is Inf, with every layer output finite:
    the message says the learning rate is likely too high, and what to do with the checkpoint."""
    t = Trainer(cfg_small(tmp_path, epochs=3, checkpoint_every=5), data=synthetic())
    ce = t.criterion

    def growing(out, y):  # the value grows 1000x a step (Inf at step 14); the gradients stay those of ce
        loss = ce(out, y)
        return loss + (10.0 ** (3 * t.global_step) - 1) * loss.detach()

    t.criterion = growing
    with pytest.raises(AnomalyError) as e:
        t.fit()
    msg = str(e.value)
    assert e.value.step == 14 and e.value.layer is None
    assert "first appeared in the loss (every layer's output was finite), which rose from" in msg
    assert "the learning rate is likely too high" in msg and "check the labels" not in msg
    assert f"last good checkpoint is kept at {t.run_dir / CHECKPOINT}" in msg
    assert "--resume would repeat the same steps (it refuses a changed --lr): start a new run" in msg
    assert "lower --lr" in msg


@pytest.mark.parametrize("impl", ["fastmlp", "torch"])
def test_compile_trains_with_monitoring_and_same_checkpoints(tmp_path, impl):
    """--compile: unmonitored steps run the compiled module, monitored ones (hooks) the eager one;
    both train the same parameters, and checkpoints keep the eager module's keys."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = synthetic()
    t = Trainer(cfg_small(tmp_path, impl=impl, compile=True, dropout=0.2, name=f"c-{impl}"), data=data)
    compiled, calls = t.compiled, []
    assert compiled is not None

    def counting(x):
        calls.append(x.shape[0])
        return compiled(x)

    t.compiled = counting
    s = t.fit()
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path really compiled
    assert len(calls) == 12  # 16 steps, 4 of them monitored (eager)
    d = Path(s["run_dir"])
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and all(math.isfinite(r["loss"]) for r in recs)
    # The monitor's activation hooks fired on its steps: those forwards were eager.
    assert [r["step"] for r in recs if "0.act/act_mean" in r] == [1, 5, 9, 13]
    assert s["history"][1]["train_loss"] < s["history"][0]["train_loss"] and s["final_test_acc"] > 0.5
    ck = torch.load(d / CHECKPOINT, weights_only=False)
    eager = Trainer(cfg_small(tmp_path, impl=impl, name=f"e-{impl}"), data=data)
    assert list(ck["model"]) == list(eager.model.state_dict())
    assert not any("_orig_mod" in k for k in ck["model"])


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_runs_do_not_depend_on_what_the_process_did_before(tmp_path, compile):
    # Identical runs in one process end with the same weights. Both Trainers are built before either
    # trains, and the caller draws random numbers in between: fit() starts from the random state the
    # run was built with (dropout's masks followed whatever ran between). Compiled (batch norm,
    # bf16): the second run used to get a dynamic batch size from dynamo's automatic dynamic
    # shapes, other kernels, other numbers (a run resumed in the process, a sweep's later trial).
    torch._dynamo.reset()
    data = synthetic()
    cfg = dict(impl="fastmlp", compile=compile, norm="batch", amp="bf16", monitor_every=0, epochs=1, dropout=0.2)
    runs = [Trainer(cfg_small(tmp_path, name=f"r{i}", **cfg), data=data) for i in range(2)]
    for t in runs:
        torch.rand(3)
        t.fit()
    a, b = (t.model.state_dict() for t in runs)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_monitor_layer_norms_are_taken_before_clipping(tmp_path, amp):
    """With --clip-grad-norm the per-layer gradient norms are the unclipped ones, like the logged total."""
    s = Trainer(cfg_small(tmp_path, amp=amp, clip_grad_norm=0.01, monitor_every=1, epochs=1, widths=[784, 32, 16, 10]),
                data=synthetic()).fit()
    recs = [json.loads(l) for l in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "0.linear/grad_norm" in r and math.isfinite(r["grad_norm"])]
    assert len(recs) >= 6
    for r in recs:
        layers = math.sqrt(sum(v ** 2 for k, v in r.items() if k.endswith(".linear/grad_norm")))
        assert r["grad_norm"] > 0.01 and layers == pytest.approx(r["grad_norm"], rel=1e-4)


def test_epoch_lr_is_the_lr_of_the_epochs_last_step(tmp_path):
    out = io.StringIO()
    s = Trainer(cfg_small(tmp_path, scheduler="cosine", epochs=3), data=synthetic(), out=out).fit()
    d = Path(s["run_dir"])
    steps = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    last = [steps[8 * e - 1]["lr"] for e in (1, 2, 3)]  # 8 steps per epoch
    assert [r["lr"] for r in s["history"]] == last
    rows = (d / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("lr")
    assert [float(r.split(",")[col]) for r in rows[1:]] == last
    assert f"last lr {last[-1]:.2e}" in out.getvalue()


def stepped_grad_norms(trainer):
    """{global step: total gradient norm the optimizer's step() saw} of the trainer's run: its step
    is wrapped (GradScaler calls it as any optimizer's), the norm taken in float64 as it is called."""
    seen, real_step = {}, trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad.detach().double() for p in trainer.params if p.grad is not None]
        seen[trainer.global_step + 1] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    return seen


def assert_clipped(recs, seen, c):
    """Each step's optimizer saw a gradient norm of at most c: the logged (pre-clip) norm scaled down
    to c when it exceeded c, else unchanged. Steps with a non-finite gradient (fp16 overflow, skipped
    by the GradScaler) are left out."""
    finite = [r for r in recs if math.isfinite(r["grad_norm"])]
    assert len(finite) >= len(recs) - 2 and all(r["step"] in seen for r in finite)
    clipped = 0
    for r in finite:
        # (1e-5: clip_grad_norm_ computes the norm, and scales by c / norm, in float32.)
        assert seen[r["step"]] <= c * (1 + 1e-5), (r["step"], seen[r["step"]], r["grad_norm"])
        if r["grad_norm"] > c:
            clipped += 1
            assert seen[r["step"]] == pytest.approx(c, rel=1e-4), r["step"]
        else:
            assert seen[r["step"]] == pytest.approx(r["grad_norm"], rel=1e-4), r["step"]
    assert clipped >= len(finite) // 2  # the threshold is below most steps' norms: the clip was exercised


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_and_clipping_train(tmp_path, amp):
    t = Trainer(cfg_small(tmp_path, amp=amp, clip_grad_norm=0.5, epochs=2), data=synthetic())
    seen = stepped_grad_norms(t)
    s = t.fit()
    recs = [json.loads(l) for l in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in recs)
    # Clipping: the logged pre-clip norms exceed the threshold, and the optimizer got clipped ones.
    assert max(r["grad_norm"] for r in recs) > 0.5
    assert_clipped(recs, seen, 0.5)
    assert s["history"][-1]["train_loss"] < s["history"][0]["train_loss"]


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_clipping_bounds_the_gradient_the_optimizer_steps_on(tmp_path, impl):
    """clip_grad_norm clips what the optimizer steps on (not only what is logged): every step's
    gradient norm at optimizer.step() is at most the threshold, the logged grad_norm the one before."""
    t = Trainer(cfg_small(tmp_path, impl=impl, clip_grad_norm=0.05, epochs=1), data=synthetic())
    seen = stepped_grad_norms(t)
    s = t.fit()
    recs = [json.loads(l) for l in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and sorted(seen) == list(range(1, 9))
    assert_clipped(recs, seen, 0.05)


@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_training_loss_is_label_smoothed_cross_entropy(tmp_path, impl):
    """The criterion is the cross-entropy with cfg.label_smoothing (the recipe's 0.1): each logged
    training loss equals F.cross_entropy(..., label_smoothing=0.1) of the model on that step's batch,
    computed here independently, and differs from the unsmoothed loss by far more than the tolerance."""
    cfg = cfg_small(tmp_path, impl=impl, dropout=0.0, epochs=1, log_every=1)
    assert cfg.label_smoothing == TrainConfig().label_smoothing == 0.1
    t = Trainer(cfg, data=synthetic())
    assert t.criterion.label_smoothing == cfg.label_smoothing
    expected, real_step = {}, t.train_step

    def step(xb, yb, *args, **kwargs):
        with torch.no_grad():  # the weights this step's forward uses (no dropout: deterministic)
            out = t.model(xb)
            expected[t.global_step + 1] = (torch.nn.functional.cross_entropy(out, yb, label_smoothing=0.1).item(),
                                           torch.nn.functional.cross_entropy(out, yb).item())
        return real_step(xb, yb, *args, **kwargs)

    t.train_step = step
    s = t.fit()
    recs = [json.loads(l) for l in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == sorted(expected) == list(range(1, 9))
    for r in recs:
        smoothed, plain = expected[r["step"]]
        assert r["loss"] == pytest.approx(smoothed, rel=1e-5)
        assert abs(smoothed - plain) > 20 * 1e-5 * smoothed  # (near-uniform predictions: ~1.5e-3 at step 1)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_fastmlp_trains_like_torch(tmp_path, device, amp):
    """The same run with fastmlp's modules and optimizer and with torch's: both learn, and their
    losses stay close step by step (different GEMM and reduction orders, so not bitwise; fp16 runs
    the GradScaler)."""
    data = synthetic_on(device)
    runs = {}
    for impl in ("fastmlp", "torch"):
        cfg = cfg_small(tmp_path, device=device, impl=impl, amp=amp, dropout=0.0, name=f"{impl}-{amp}")
        s = Trainer(cfg, data=data).fit()
        runs[impl] = [json.loads(l)["loss"] for l in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert len(runs[impl]) == 16 and all(math.isfinite(v) for v in runs[impl])
        assert s["history"][1]["train_loss"] < s["history"][0]["train_loss"] and s["final_test_acc"] > 0.5
    tol = 1e-4 if amp == "off" else 1e-2  # measured on the CPU: 1e-7, 3e-4 (bf16), 3e-5 (fp16)
    assert runs["fastmlp"] == pytest.approx(runs["torch"], rel=tol)


@pytest.mark.parametrize("init", ["xavier", "he", "lsuv"])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_inits_and_norms_train(tmp_path, init, norm):
    s = Trainer(cfg_small(tmp_path, init=init, norm=norm, optimizer="sgd", nesterov=True, scheduler="cosine", lr=0.05,
                          monitor_every=0, epochs=2), data=synthetic()).fit()
    assert s["history"][-1]["train_loss"] < s["history"][0]["train_loss"]


def test_batch_norm_leaves_out_a_last_batch_of_one(tmp_path):
    """BatchNorm cannot train on one sample: a last batch of 1 is dropped (said once), a last
    micro-batch of 1 joins the one before it, and configs with only 1-sample batches are errors."""
    data = synthetic(n_train=129)
    sizes = [len(x) for x, _ in data.train.batches(64, min_size=2)]
    assert sizes == [64, 64] and data.train.num_batches(64, min_size=2) == 2 and data.train.dropped(64, 2) == 1
    assert [len(x) for x, _ in data.train.batches(64)] == [64, 64, 1]
    out = io.StringIO()
    s = Trainer(cfg_small(tmp_path, norm="batch", epochs=2, name="drop"), data=data, out=out).fit()
    assert s["steps"] == 4 and out.getvalue().count("left out (128 of 129 samples per epoch)") == 1
    # batch 64 x accum 3: one step of 129 = micro-batches 64, 64, 1 -> 64, 65
    t = Trainer(cfg_small(tmp_path, norm="batch", batch_size=64, accum_steps=3, epochs=1, name="merge"), data=data, out=out)
    assert t._micro(129) == [64, 65] and t._micro(128) == [64, 64]
    assert t.fit()["steps"] == 1 and "joins the micro-batch before it" in out.getvalue()
    with pytest.raises(ConfigError, match="'batch_size' must be >= 2 with norm batch"):
        cfg_small(tmp_path, norm="batch", batch_size=1).validate()
    with pytest.raises(ConfigError, match="--samples must be >= 2 with --norm batch"):
        check_overfit(cfg_small(tmp_path, norm="batch"), samples=1)
    with pytest.raises(ConfigError, match="norm batch needs at least 2 training samples"):
        Trainer(cfg_small(tmp_path, norm="batch"), data=synthetic(n_train=1))


def _dying(trainer, at):
    """Make trainer's train_step raise KeyboardInterrupt at its at-th call (a Ctrl-C mid-run)."""
    orig, calls = trainer.train_step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return orig(*a, **k)

    trainer.train_step = step


def test_interrupted_run_writes_summary_and_plots_and_says_where(tmp_path, monkeypatch, capsys):
    data = synthetic()
    t = Trainer(cfg_small(tmp_path, epochs=3, checkpoint_every=5, plots=True, name="int"), data=data)
    _dying(t, 13)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 12 and len(summary["history"]) == 1
    assert summary["checkpoint"] == {"epochs_done": 1, "batches_into_epoch": 2, "step": 10}
    assert (t.run_dir / "loss.png").is_file() and "loss.png" in summary["plots"]
    msg = t.stop_message()
    assert f"run folder {t.run_dir} has a checkpoint from epoch 2, step 10" in msg and f"--resume {t.run_dir}" in msg
    # Before the first checkpoint; and a plotting failure neither hides the Ctrl-C nor loses the summary.
    import fastmlp.train.plots as plots

    def broken(*a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "write_plots", broken)
    t = Trainer(cfg_small(tmp_path, plots=True, name="early"), data=data)
    _dying(t, 3)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert "no checkpoint yet" in t.stop_message() and "cannot be resumed" in t.stop_message()
    assert json.loads((t.run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert "no display" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_while_the_checkpoint_is_written_leaves_that_checkpoint(tmp_path, monkeypatch, sig):
    """A SIGINT (or a SIGTERM, which the CLI takes as one) in the middle of torch.save's write is held
    until checkpoint.pt is complete: the run ends "interrupted" (not "failed" with torch's "unexpected
    pos") at the checkpoint just written."""
    import fastmlp.train.checkpoint as checkpoint
    from fastmlp.train.cli import Terminated, _sigterm_as_interrupt

    orig, calls = checkpoint._atomic, {"n": 0}

    class SigintMidWrite:
        def __init__(self, f):
            self.f, self.n, self.sent = f, 0, False

        def write(self, b):
            self.n += len(b)
            if self.n > 20_000 and not self.sent:  # the weights are being written
                self.sent = True
                signal.raise_signal(sig)
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

    def atomic(path, write):
        if Path(path).name == CHECKPOINT:
            calls["n"] += 1
            if calls["n"] == 2:  # the one at the end of epoch 1 (step 8)
                return orig(path, lambda f: write(SigintMidWrite(f)))
        return orig(path, write)

    monkeypatch.setattr(checkpoint, "_atomic", atomic)
    # Python's own Ctrl-C handler, as in a terminal: a test runner started in the background
    # (`cmd &` in a script) inherits SIGINT ignored, and Python then installs none.
    handler = signal.default_int_handler
    old = signal.signal(signal.SIGINT, handler)
    try:
        with _sigterm_as_interrupt() as terms:
            t = Trainer(cfg_small(tmp_path, epochs=3, checkpoint_every=5), data=synthetic())
            with pytest.raises(Terminated if sig == signal.SIGTERM else KeyboardInterrupt):
                t.fit()
            assert calls["n"] == 2 and signal.getsignal(signal.SIGINT) is handler
        assert terms == ([signal.SIGTERM] if sig == signal.SIGTERM else [])
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, old)
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint"]["step"] == 8
    assert torch.load(t.run_dir / CHECKPOINT, weights_only=False)["global_step"] == 8
    assert "a checkpoint from the end of epoch 1 (step 8)" in t.stop_message() and not list(t.run_dir.glob(".*.tmp"))


def test_an_error_raised_by_a_ctrl_c_counts_as_the_interrupt(tmp_path):
    """Code between the signal and the loop that turns a KeyboardInterrupt into another error
    (torch.save's zip writer raises RuntimeError("unexpected pos") then) still stops the run as interrupted."""
    t = Trainer(cfg_small(tmp_path, epochs=3, checkpoint_every=5), data=synthetic())
    orig = t.train_step

    def step(*a, **k):
        if t.global_step == 7:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7744 vs 7638") from None
        return orig(*a, **k)

    t.train_step = step
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint"]["step"] == 5
    assert "--resume" in t.stop_message()


def test_resume_removes_stale_temp_files_of_the_writer_only(tmp_path):
    data = synthetic()
    t = Trainer(cfg_small(tmp_path, epochs=2), data=data)
    _dying(t, 9)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    stale = [".checkpoint.pt.k2_9xq0a.tmp", ".summary.json.abcdefgh.tmp", ".metrics.csv.0123abcd.tmp"]
    kept = [".checkpoint.pt.tmp", "checkpoint.pt.abcdefgh.tmp", ".checkpoint.pt.abcdefgh.tmp.bak",
            ".other.abcdefgh.tmp", "notes.tmp"]
    for name in stale + kept:  # what a SIGKILL mid-write leaves, and files of other names
        (t.run_dir / name).write_bytes(b"x")
    r = Trainer.resume(t.run_dir, data=data)
    assert not [n for n in stale if (t.run_dir / n).exists()]
    assert all((t.run_dir / n).exists() for n in kept)
    r.fit()


def test_failed_resume_names_the_problem_and_changes_nothing(tmp_path, capsys):
    from fastmlp.train.checkpoint import CheckpointError

    data = synthetic()
    t = Trainer(cfg_small(tmp_path, epochs=3, name="src"), data=data)
    _dying(t, 9)  # first step of epoch 2: the epoch-1 checkpoint exists
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    good = torch.load(t.run_dir / CHECKPOINT, weights_only=False)

    def case(name, ck, config=None):
        d = tmp_path / name
        d.mkdir()
        for f in t.run_dir.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        torch.save(ck, d / CHECKPOINT)
        if config is not None:
            (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return d

    def snapshot(d):
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()}

    cases = [
        (case("plain", good["model"]), "is not a fastmlp training checkpoint: it holds a model state_dict"),
        (case("version", dict(good, version=99)), "saved by an incompatible version of fastmlp .*format 99"),
        (case("weights", dict(good, config=dict(good["config"], widths=[784, 16, 10])),
              config=dict(good["config"], widths=[784, 16, 10])),
         r"the weights do not match the model its config describes \(widths \[784, 16, 10\].*size mismatch"),
        # Another run's checkpoint copied into this folder: its config is not the folder's.
        (case("copied", dict(good, config=dict(good["config"], widths=[784, 16, 10], lr=0.5))),
         r"is not this run's checkpoint: its config differs from .*config.yaml \(widths: \[784, 16, 10\] in the "
         r"checkpoint, \[784, 32, 10\] in config.yaml; lr: 0.5 in the checkpoint"),
    ]
    for d, match in cases:
        before = snapshot(d)
        with pytest.raises(CheckpointError, match=match) as e:
            Trainer.resume(d, overrides={"progress": "off"}, data=data)
        assert str(d / CHECKPOINT) in str(e.value)
        assert snapshot(d) == before
    d = case("data", good)
    before = snapshot(d)
    with pytest.raises(CheckpointError, match="trained on other data: 512 training images"):
        Trainer.resume(d, data=synthetic(n_train=500))
    assert snapshot(d) == before
    # Files of the same size and mean but other contents (a relabelled copy): their fingerprints differ.
    d = case("relabelled", dict(good, data=dict(good["data"], digest="0" * 32)))
    before = snapshot(d)
    with pytest.raises(CheckpointError, match=r"hold other images or labels than the run's \(fingerprint f{32}, "
                                              r"the run's 0{32}\)"):
        Trainer.resume(d, data=dataclasses.replace(data, digest="f" * 32))
    assert snapshot(d) == before
    Trainer.resume(d, overrides={"progress": "off"}, data=dataclasses.replace(data, digest="0" * 32))  # the same
    # Through the CLI: exit status 1, the message, no traceback.
    assert main(["train", "--resume", str(cases[0][0])]) == 1
    err = capsys.readouterr().err
    assert "is not a fastmlp training checkpoint" in err and "Traceback" not in err


# ---- real data -----------------------------------------------------------------------------------
def _cli(*args, env=None, **kw):
    # The fastmlp these tests import (a built checkout, or an installed package when the tests run
    # from an unpacked sdist, whose own tree is not built), run from the folder that holds it.
    home = str(Path(fastmlp.__file__).resolve().parents[1])
    e = dict(os.environ, FASTMLP_DATA=real_data_dir(), PYTHONPATH=home)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "fastmlp", *args], cwd=home, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_mid_epoch_then_resume_reproduces_losses(tmp_path):
    args = ["train", "--impl", "torch", "--train-subset", "6000", "--batch-size", "32", "--widths", "784", "64", "10",
            "--epochs", "2", "--checkpoint-every", "25", "--log-every", "10", "--monitor-every", "0",
            "--progress", "off", "--no-plots", "--device", "cpu", "--out-dir", str(tmp_path)]
    # One thread in every run: a CI dry run on a machine loaded by other tests once saw the reference
    # and the victim, identical runs, differ by 1 ulp from step 10 on (before any kill), with the BLAS's
    # GEMMs on two threads; on one their sums have one order whatever the machine does meanwhile.
    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ref = _cli(*args, "--name", "ref", env=one)
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out
    victim = _cli(*args, "--name", "victim", env=one)
    ck = None
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        found = list(tmp_path.glob(f"*-victim/{CHECKPOINT}"))
        if found:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    run = next(tmp_path.glob("*-victim"))
    ck = torch.load(run / CHECKPOINT, weights_only=False)
    assert 0 < ck["step_in_epoch"] < 188, "the kill should land mid-epoch"
    res = _cli("train", "--resume", str(run), "--progress", "off", env=one)
    out, _ = res.communicate(timeout=240)
    assert res.returncode == 0, out
    assert "resuming" in out
    loss = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    ref_dir = next(tmp_path.glob("*-ref"))
    assert len(loss(ref_dir)) == 2 * 188
    assert loss(run) == loss(ref_dir)
    assert json.loads((run / "summary.json").read_text())["final_test_acc"] == \
        json.loads((ref_dir / "summary.json").read_text())["final_test_acc"]


def test_sigterm_stops_a_cli_run_as_ctrl_c_does(tmp_path):
    # A job scheduler's stop, `timeout`, `docker stop`: the run writes its summary (interrupted), says
    # how to resume, exits with 143, and the resumed run completes with every step logged once.
    args = ["train", "--impl", "torch", "--train-subset", "2000", "--batch-size", "32", "--widths", "784", "32", "10",
            "--epochs", "2", "--checkpoint-every", "10", "--log-every", "5", "--monitor-every", "0",
            "--progress", "off", "--no-plots", "--device", "cpu", "--out-dir", str(tmp_path)]
    victim = _cli(*args)
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None and not list(tmp_path.glob(f"*/{CHECKPOINT}")):
        time.sleep(0.002)
    victim.send_signal(signal.SIGTERM)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == 143, out
    run = next(tmp_path.glob("*-fmnist-mlp"))
    assert "terminated (SIGTERM); run folder" in out and f"--resume {run}" in out, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "terminated (SIGTERM)"
    res = _cli("train", "--resume", str(run), "--progress", "off")
    out, _ = res.communicate(timeout=240)
    assert res.returncode == 0, out
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * 63 + 1))


def test_python_resume_refuses_overrides_that_change_results(tmp_path):
    # Trainer.resume / resume_sweep hold to the CLI's rule: a resumed run keeps its saved config
    # (epochs=5 used to train on with the old one-cycle total and fail at its end, stuck, with the
    # new config already in the checkpoint; lr or seed ran on and misreported the run).
    t = Trainer(cfg_small(tmp_path, epochs=3, name="src"), data=synthetic())
    _dying(t, 9)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    before = (t.run_dir / CHECKPOINT).read_bytes()
    for bad in ({"epochs": 5}, {"lr": 0.5, "progress": "off"}, {"batch_size": 32}, {"seed": 3}):
        with pytest.raises(ConfigError, match=f"{sorted(set(bad) - {'progress'})[0]} cannot change on resume"):
            Trainer.resume(t.run_dir, overrides=bad, data=synthetic())
    assert (t.run_dir / CHECKPOINT).read_bytes() == before
    t2 = Trainer.resume(t.run_dir, overrides={"log_every": 2, "monitor_every": 0}, data=synthetic())
    assert t2.fit()["status"] == "completed"


def test_ctrl_c_during_the_last_plots_leaves_the_summary(tmp_path, monkeypatch):
    # A run that trained every epoch and is stopped while it draws its plots has its summary.json
    # (it had none: `fastmlp runs` showed it unfinished).
    import fastmlp.train.plots as plots

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "write_plots", interrupted)
    t = Trainer(cfg_small(tmp_path, epochs=1, plots=True), data=synthetic())
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1


def test_resume_refuses_config_changes(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--lr", "0.1"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--compile"]) == 2
    assert "drop --compile" in capsys.readouterr().err


def test_cli_resume_interrupt_done_complete_and_checkpoint_path(tmp_path, monkeypatch, capsys):
    """Ctrl-C names the run folder and its checkpoint; resume prints done:, accepts the checkpoint's
    path and the options that cannot change results; a complete run is left untouched."""
    args = ["train", "--data-dir", real_data_dir(), "--train-subset", "512", "--batch-size", "64", "--epochs", "2",
            "--widths", "784", "16", "10", "--impl", "torch", "--device", "cpu", "--progress", "off",
            "--out-dir", str(tmp_path), "--monitor-every", "0", "--no-plots"]
    orig = Trainer.train_step
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # step 3 of epoch 2
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", dying)
    assert main(args) == 130
    run = next(tmp_path.glob("*-fmnist-mlp"))
    err = capsys.readouterr().err
    assert f"run folder {run} has a checkpoint from the end of epoch 1 (step 8)" in err
    assert f"python -m fastmlp train --resume {run}" in err
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    # While the run trains on, its stale summary (interrupted) is gone: `fastmlp runs` shows it unfinished.
    summary_seen = []

    def spy(self, *a, **k):
        summary_seen.append((run / "summary.json").exists())
        return orig(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", spy)
    # The checkpoint file's path; options that cannot change the results may differ.
    assert main(["train", "--resume", str(run / CHECKPOINT), "--data-dir", real_data_dir(), "--log-every", "7",
                 "--checkpoint-every", "3", "--no-anomaly-guard", "--progress", "off"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "done: test acc" in out and f"run folder {run}" in out
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert summary_seen == [False] * 8
    monkeypatch.setattr(Trainer, "train_step", orig)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--progress", "off"]) == 0
    out = capsys.readouterr().out
    assert f"run {run} is already complete: all 2 epochs trained (step 16)" in out and "resuming" not in out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before
    assert main(["train", "--resume", str(run / "summary.json")]) == 2
    assert f"Did you mean --resume {run}?" in capsys.readouterr().err


def test_subcommands_honour_amp_and_warn_about_ignored_flags(tmp_path, monkeypatch, capsys):
    real_autocast, seen = torch.autocast, []

    def spy(device_type, dtype=None, enabled=True, **kw):
        seen.append((dtype, enabled))
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    common = ["--data-dir", real_data_dir(), "--train-subset", "512", "--widths", "784", "16", "10", "--impl", "torch",
              "--device", "cpu", "--amp", "bf16", "--out-dir", str(tmp_path)]
    assert main(["lr-find", *common, "--num-steps", "12", "--epochs", "3", "--compile", "--lr", "0.1", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "warning: --compile has no effect" in err and "--epochs, --lr have no effect" in err
    assert "--amp" not in err and "--no-plots" not in err and "--plots" not in err
    assert seen and all(s == (torch.bfloat16, True) for s in seen)
    assert not list(tmp_path.glob("*/lr_find.png")) and list(tmp_path.glob("*/lr_find.json"))  # --no-plots honoured
    seen.clear()
    main(["check-overfit", *common, "--samples", "8", "--max-steps", "10", "--accum-steps", "2", "--dropout", "0.5",
          "--ema", "0.99"])
    err = capsys.readouterr().err
    assert "--accum-steps has no effect (--samples sets its one batch)" in err and "--dropout has no effect" in err
    assert "--ema has no effect (it reads the loss of the trained weights, not of an average of them)" in err
    assert seen and all(s == (torch.bfloat16, True) for s in seen)
    with pytest.raises(SystemExit):
        main(["check-overfit", "--help"])
    out = capsys.readouterr().out
    assert "--max-steps N" in out and "PASSED once the cross-entropy" in out and "--target-loss X" in out


def test_check_overfit_and_lr_find(tmp_path, capsys):
    base = TrainConfig(impl="torch", widths=[784, 128, 10], data_dir=real_data_dir(), device="cpu",
                       out_dir=str(tmp_path), train_subset=2048)
    passed, loss, steps = check_overfit(base, samples=32, max_steps=300)
    assert passed and loss < 0.01
    failed, loss, _ = check_overfit(dataclasses.replace(base, lr=1e-7), samples=32, max_steps=20)
    assert not failed and "FAILED" in capsys.readouterr().out
    r = lr_find(dataclasses.replace(base, batch_size=64), num_steps=60, start_lr=1e-6, end_lr=1.0)
    assert 1e-6 <= r["suggested_lr"] <= 1.0
    assert (Path(r["run_dir"]) / "lr_find.png").stat().st_size > 1000
    assert len(r["lrs"]) >= 30 and r["lrs"] == sorted(r["lrs"])
    # A suggestion reads the slope of more than 10 points: fewer steps are refused up front, and a
    # loss that is not finite within them says so rather than "no clear descent".
    with pytest.raises(ConfigError, match=r"--num-steps must be >= 11 \(a suggestion reads the slope of more than 10"):
        lr_find(base, num_steps=10)
    r = lr_find(dataclasses.replace(base, plots=False), num_steps=11, start_lr=1e3, end_lr=1e9)
    assert r["suggested_lr"] is None and "too few to suggest an lr" in capsys.readouterr().out


def test_output_paths_that_cannot_be_written_name_the_option(tmp_path, capsys):
    # An --out-dir that is a file, a --plot or --out in a missing folder: the option and the path
    # the user gave, not a temp file's name or a bare errno.
    (tmp_path / "my.yaml").write_text("lr: 0.1\n")
    assert main(["train", "--out-dir", str(tmp_path / "my.yaml"), "--data-dir", real_data_dir()]) == 2
    assert f"config option 'out_dir' ({tmp_path / 'my.yaml'}) is a file, not a folder" in capsys.readouterr().err
    assert main(["runs", str(tmp_path), "--plot", str(tmp_path / "no" / "x.png")]) == 2
    assert f"--plot {tmp_path / 'no' / 'x.png'}: the folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "no" / "m.pt2")]) == 2
    assert f"--out {tmp_path / 'no' / 'm.pt2'}: the folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err
    from fastmlp.train.checkpoint import atomic_write_json
    with pytest.raises(FileNotFoundError, match=f"cannot write {tmp_path / 'no' / 's.json'}: the folder"):
        atomic_write_json(tmp_path / "no" / "s.json", {})
    from fastmlp.train.plots import _line
    assert _line([(0, 1.0)]) == "o-" and _line([(0, 1.0), (1, 2.0)]) == "-"   # a lone monitor point is drawn


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "fastmlp"])
def test_default_model_two_epochs_real_data(tmp_path, impl):
    cfg = TrainConfig(impl=impl, epochs=2, device="cpu", data_dir=real_data_dir(), out_dir=str(tmp_path),
                      progress="off", plots=False)
    s = Trainer(cfg).fit()
    assert s["final_test_acc"] >= 0.85, s["history"]


def test_help_and_readme_state_what_accumulation_and_resume_reproduce(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Dropout masks are drawn per micro-batch" in out and "num_batches_tracked counts micro-batches" in out
    assert "its lr column, like the epoch line's 'last lr', is the lr of the epoch's last step" in out
    readme = (REPO / "README.md").read_text().split("## Training", 1)[1].split("\n## ", 1)[0]
    readme = " ".join(readme.replace("`", "").split())
    assert "num_batches_tracked counts micro-batches" in readme and "torch.get_num_threads()" in readme
    assert "lr of the epoch's last step" in readme and "before clipping" in readme


def test_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path), "--impl", "torch", "--out-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in err and "Nothing is downloaded" in err


def test_compare_runs_both_impls(tmp_path, capsys):
    rc = main(["train", "--compare", "--data-dir", real_data_dir(), "--train-subset", "2048", "--epochs", "1",
               "--widths", "784", "64", "10", "--out-dir", str(tmp_path), "--no-plots", "--progress", "off",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--- impl torch ---" in out and "--- impl fastmlp ---" in out and "speedup" in out
    summaries = {json.loads(p.read_text())["impl"]: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert set(summaries) == {"torch", "fastmlp"}
    # Same seed, same data order, same initial weights: the two impls land within noise of each other.
    assert abs(summaries["torch"]["final_test_acc"] - summaries["fastmlp"]["final_test_acc"]) < 0.02
