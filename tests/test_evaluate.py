"""fastmlp evaluate and fastmlp.train.load_model: a trained run as a model, on the real test set."""

import json
from pathlib import Path

import pytest
import torch

from fastmlp.data import CLASSES, load_fashion_mnist
from fastmlp.train import ConfigError, TrainedModel, load_model
from fastmlp.train.cli import main
from test_data import real_data_dir, write_dataset


def train_run(tmp_path, *extra, impl="fastmlp", device="cpu", data_dir=None):
    """A small run (1024 training images, 2 epochs) on Fashion-MNIST or data_dir; its run folder."""
    out = tmp_path / "runs"
    args = ["train", "--data-dir", data_dir or real_data_dir(), "--out-dir", str(out), "--impl", impl, "--train-subset", "1024",
            "--batch-size", "128", "--epochs", "2", "--widths", "784", "32", "10", "--progress", "off",
            "--monitor-every", "0", "--no-plots", "--device", device, *extra]
    assert main(args) == 0
    (run,) = out.iterdir()
    return run


def test_train_points_to_evaluate(tmp_path, capsys):
    run = train_run(tmp_path)
    assert f"next: fastmlp evaluate {run}  (per class" in capsys.readouterr().out


def evaluate(run, *extra, device="cpu", data_dir=None):
    assert main(["evaluate", str(run), "--data-dir", data_dir or real_data_dir(), "--device", device, *extra]) == 0
    weights = extra[extra.index("--weights") + 1] if "--weights" in extra else "last"
    return json.loads((run / f"evaluation-{weights}.json").read_text())


@pytest.fixture(scope="module")
def test_set():
    raw = load_fashion_mnist(real_data_dir(), download=False)
    return raw["test_images"], raw["test_labels"]


@pytest.mark.parametrize("impl,amp", [("fastmlp", "off"), ("torch", "off"), ("fastmlp", "bf16")])
def test_evaluate_reproduces_the_runs_test_metrics(tmp_path, capsys, device, impl, amp):
    # A lent GPU machine has no copy of Fashion-MNIST: there, random images in its file format.
    data = real_data_dir() if device == "cpu" else str(write_dataset(tmp_path / "data", 1024, 500).parents[1])
    run = train_run(tmp_path, "--amp", amp, impl=impl, device=device, data_dir=data)
    capsys.readouterr()
    ev = evaluate(run, device=device, data_dir=data)
    assert ev["device"].startswith(device)
    summary = json.loads((run / "summary.json").read_text())
    # The same weights, normalisation, batches and autocast as the run's last evaluation: equal numbers.
    assert ev["test_acc"] == summary["final_test_acc"]
    assert ev["test_loss"] == summary["history"][-1]["test_loss"]
    conf = torch.tensor(ev["confusion"])
    labels = load_fashion_mnist(data, download=False)["test_labels"]
    assert conf.shape == (10, 10) and conf.sum() == ev["n_test"] == len(labels)
    assert conf.sum(1).tolist() == torch.bincount(labels, minlength=10).tolist()
    assert conf.diag().sum().item() / len(labels) == pytest.approx(ev["test_acc"], abs=1e-12)
    for i, name in enumerate(CLASSES):
        assert ev["per_class_acc"][name] == pytest.approx(conf[i, i].item() / conf[i].sum().item(), abs=1e-12)
    assert (run / "confusion-last.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"test accuracy {ev['test_acc']:.4f}" in printed and "Ankle boot" in printed
    assert "confusion matrix" in printed and str(run / "evaluation-last.json") in printed


def test_best_weights_and_their_errors(tmp_path, capsys):
    run = train_run(tmp_path, "--val-split", "0.1")
    best = torch.load(run / "best.pt", weights_only=False)
    ev = evaluate(run, "--weights", "best", "--no-plots")
    assert ev["file"] == "best.pt" and ev["test_acc"] == best["test_acc"]
    # The file itself selects its weights.
    assert load_model(run / "best.pt").config == load_model(run, weights="best").config
    assert main(["evaluate", str(run / "best.pt"), "--data-dir", real_data_dir(), "--device", "cpu", "--no-plots"]) == 0
    assert json.loads((run / "evaluation-best.json").read_text())["test_acc"] == best["test_acc"]
    (run / "notes.txt").write_text("")
    assert main(["evaluate", str(run / "notes.txt"), "--device", "cpu"]) == 2
    assert "neither a run folder nor its checkpoint.pt or best.pt" in capsys.readouterr().err
    assert not (run / "confusion-best.png").exists()
    # A run without a validation split has no best.pt: the error says why and what to use.
    plain = train_run(tmp_path / "b")
    capsys.readouterr()
    assert main(["evaluate", str(plain), "--weights", "best", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no best.pt" in err and "--val-split" in err and "--weights last" in err
    assert main(["evaluate", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--device", "cpu"]) == 2
    assert "has no checkpoint.pt" in capsys.readouterr().err


def test_load_model_on_cuda_without_cuda_kernels_says_what_to_do(tmp_path, monkeypatch):
    import fastmlp

    run = train_run(tmp_path)
    monkeypatch.setattr(fastmlp, "WITH_CUDA", False)
    with pytest.raises(RuntimeError, match="no CUDA kernels.*use --device cpu"):
        load_model(run, device="cuda")


def test_load_model_predicts_from_raw_images(tmp_path, test_set):
    run = train_run(tmp_path)
    images, labels = test_set
    ev = evaluate(run, "--no-plots")
    model = load_model(run)
    assert isinstance(model, TrainedModel) and not model.training and model.classes == CLASSES
    assert model.config.widths == [784, 32, 10]
    pred = model.predict(images)  # uint8 (N, 28, 28), as read from the IDX file
    conf = torch.zeros(10, 10, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    assert conf.tolist() == ev["confusion"]
    # Floats in [0, 1] (ToTensor's scale) as (N, 1, 28, 28), flat (N, 784), and one image alone.
    floats = images[:64].float().div(255)
    kept = floats.clone()
    assert torch.equal(model.predict(floats.unsqueeze(1)), pred[:64])
    assert torch.equal(floats, kept)  # the caller's tensor is left as it was
    assert torch.equal(model.predict(images[:64].reshape(64, 784)), pred[:64])
    assert model.predict(images[7]).tolist() == [pred[7].item()]
    # Eval mode: dropout is off, so two calls agree.
    with torch.no_grad():
        assert torch.equal(model(images[:32]), model(images[:32]))
    # The run's fastmlp weights load into the torch implementation too (same state_dict keys).
    as_torch = load_model(run, impl="torch")
    with torch.no_grad():
        torch.testing.assert_close(as_torch(images[:256]), model(images[:256]), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="uint8 pixels"):
        model(images[:4].int())
    with pytest.raises(ValueError, match=r"\(N, 28, 28\).*got shape \[4, 27, 28\]"):
        model(images[:4, :27])
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(images[:4].numpy())


def test_best_pt_of_an_older_run_takes_the_normalisation_from_the_checkpoint(tmp_path, test_set):
    run = train_run(tmp_path, "--val-split", "0.1")
    best = torch.load(run / "best.pt", weights_only=False)
    assert "data" not in best  # best.pt keeps only the weights, config and scores
    model = load_model(run, weights="best")
    data = torch.load(run / "checkpoint.pt", weights_only=False)["data"]
    assert model.mean.item() == pytest.approx(data["mean"]) and model.std.item() == pytest.approx(data["std"])
    # Without checkpoint.pt, summary.json's record of it is used.
    (run / "checkpoint.pt").unlink()
    assert load_model(run, weights="best").std.item() == pytest.approx(data["std"])
    (run / "summary.json").unlink()
    with pytest.raises(ConfigError, match="no input normalisation"):
        load_model(run, weights="best")


def test_evaluate_removes_its_own_stale_temp_files_only(tmp_path):
    run = train_run(tmp_path)
    stale = run / ".evaluation-last.json.abcd1234.tmp"
    other = run / ".checkpoint.pt.abcd1234.tmp"
    stale.write_text("{")
    other.write_text("x")
    evaluate(run, "--no-plots")
    assert not stale.exists() and other.exists()
    assert Path(run / "checkpoint.pt").is_file()


def test_predict_image_files(tmp_path, capsys, test_set):
    from PIL import Image

    from fastmlp.train import load_images, predict_files

    run = train_run(tmp_path)
    images, _ = test_set
    model = load_model(run)
    # A test image as a 28 x 28 PNG comes back pixel for pixel (dark border: not inverted).
    exact = tmp_path / "boot.png"
    Image.fromarray(images[0].numpy()).save(exact)
    assert torch.equal(load_images([exact])[0], images[0])
    # As a photo would be: dark on light, in colour, 3x larger, JPEG: inverted and scaled back close to it.
    photo = tmp_path / "pullover.jpg"
    Image.fromarray(255 - images[1].numpy()).convert("RGB").resize((84, 84), Image.Resampling.NEAREST).save(
        photo, quality=95)
    back = load_images([photo])[0]
    assert (back.float() - images[1].float()).abs().mean() < 6
    assert load_images([photo], invert="no")[0].float().mean() > 127  # left light
    # Not square: padded with its border's grey to keep the aspect ratio, then 28 x 28.
    wide = tmp_path / "wide.png"
    Image.fromarray(torch.zeros(20, 50, dtype=torch.uint8).numpy()).save(wide)
    assert load_images([wide]).shape == (1, 28, 28)
    # 16-bit grey (Pillow's I;16) and float grey in [0, 1] come back as the 8-bit image (convert("L")
    # alone clipped them to white); one path may be given as it is.
    deep, flt = tmp_path / "boot16.png", tmp_path / "boot.tiff"
    Image.fromarray(images[0].numpy().astype("uint16") * 257).save(deep)
    Image.fromarray(images[0].numpy().astype("float32") / 255).save(flt)
    assert Image.open(deep).mode == "I;16" and Image.open(flt).mode == "F"
    assert torch.equal(load_images(deep)[0], images[0]) and torch.equal(load_images(str(flt))[0], images[0])

    capsys.readouterr()
    assert main(["predict", str(run), str(exact), str(photo), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(exact)) and lines[1].startswith(str(photo))
    result = predict_files(run, [exact, photo], top=10)
    assert result[0][1][0][0] == CLASSES[model.predict(images[:1]).item()]
    for _, ranked in result:
        probs = [p for _, p in ranked]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert sorted(name for name, _ in ranked) == sorted(CLASSES)
    assert f"{result[0][1][0][0]} {result[0][1][0][1]:.1%}" in lines[0]

    assert main(["predict", str(run), str(exact), "--top", "0"]) == 2
    assert "top must be a whole number from 1 to 10" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["predict", str(run), str(tmp_path / "notes.txt")]) == 2
    assert "is not an image file" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "missing.png")]) == 2
    assert "no such image file" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["float", "pixels"])
def test_export_runs_with_torch_alone(tmp_path, capsys, test_set, fmt):
    import os
    import subprocess
    import sys

    run = train_run(tmp_path, "--val-split", "0.1")
    images, _ = test_set
    out = tmp_path / "deploy" / "fmnist.pt2"
    out.parent.mkdir()
    capsys.readouterr()
    assert main(["export", str(run), "--weights", "best", "--input", fmt, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    batch = images[:37] if fmt == "pixels" else images[:37].float().div(255).unsqueeze(1)
    torch.save(batch, tmp_path / "batch.pt")
    # Another process, from another folder, without fastmlp on its path: torch alone loads and runs it.
    script = ("import sys, torch\n"
              f"program = torch.export.load({str(out)!r}).module()\n"
              f"logits = program(torch.load({str(tmp_path / 'batch.pt')!r}))\n"
              "one = program(torch.load(" + repr(str(tmp_path / "batch.pt")) + ")[:1])\n"
              f"torch.save((logits, one), {str(tmp_path / 'logits.pt')!r})\n"
              "assert not any(m.split('.')[0] == 'fastmlp' for m in sys.modules), 'fastmlp was imported'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "deploy", env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logits, one = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        assert torch.equal(logits, load_model(run, weights="best", impl="torch")(batch))
        torch.testing.assert_close(logits, load_model(run, weights="best")(batch), rtol=1e-5, atol=1e-5)
    assert logits.shape == (37, 10) and one.shape == (1, 10)  # any batch size, one image too
    torch.testing.assert_close(one, logits[:1], rtol=1e-5, atol=1e-5)  # (a 1-row GEMM may round differently)
    # Default path: into the run folder.
    assert main(["export", str(run)]) == 0
    assert (run / "model-last.pt2").is_file()


@pytest.mark.parametrize("fmt", ["float", "pixels"])
def test_export_onnx_runs_in_onnxruntime(tmp_path, capsys, test_set, fmt):
    ort = pytest.importorskip("onnxruntime")
    run = train_run(tmp_path)
    images, _ = test_set
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--input", fmt]) == 0
    path = run / "model-last.onnx"
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "onnxruntime.InferenceSession" in out
    batch = images[:37] if fmt == "pixels" else images[:37].float().div(255).unsqueeze(1)
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    logits = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    one = torch.from_numpy(session.run(None, {"images": batch[:1].numpy()})[0])
    with torch.no_grad():
        expected = load_model(run, impl="torch")(batch)
    assert logits.shape == (37, 10) and one.shape == (1, 10)  # any batch size
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, expected[:1], rtol=1e-5, atol=1e-5)
    assert not list(run.glob("*.tmp*"))


def test_export_onnx_without_its_packages_says_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    run = train_run(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    assert main(["export", str(run), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "ONNX export needs the onnx and onnxscript packages" in err and "pip install" in err
    assert not (run / "model-last.onnx").exists()
    with pytest.raises(SystemExit) as exit:
        main(["export", str(run), "--format", "tflite"])
    assert exit.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
