"""A trained run as a model: load it for predictions, and evaluate it on the Fashion-MNIST test set.

    model = fastmlp.train.load_model("runs/20261130-220000-fmnist-mlp")  # eval mode, on the CPU
    labels = model.predict(images)      # images: uint8 (N, 28, 28) as in the IDX files, or float in [0, 1]
    names = [model.classes[i] for i in labels]

    python -m fastmlp evaluate runs/20261130-220000-fmnist-mlp [--weights best] [--device cuda]
    python -m fastmlp predict runs/20261130-220000-fmnist-mlp shoe.jpg shirt.png [--top 3]
    python -m fastmlp export runs/20261130-220000-fmnist-mlp      # model-last.pt2: torch alone runs it

The model carries the run's input normalisation (the training split's mean and std, stored in the
checkpoint), so it takes images as they come; `evaluate` reproduces the test accuracy and loss the
run reported for the same weights, adds per-class accuracy and the confusion matrix, and writes
them into the run folder (evaluation-<weights>.json, confusion-<weights>.png).
"""

import importlib
import io
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..data import CLASSES, load_fashion_mnist
from .checkpoint import atomic_write_bytes, atomic_write_json, remove_stale_temp_files
from .config import ConfigError, TrainConfig
from .engine import AMP_DTYPES, EVAL_BATCH, evaluation_sums, make_mlp, resolve_device

__all__ = ["TrainedModel", "load_model", "evaluate_run", "load_images", "predict_files", "export_model"]

WEIGHTS = {"last": "checkpoint.pt", "best": "best.pt"}


class TrainedModel(nn.Module):
    """A trained MLP with its input normalisation: ``forward(images)`` gives the logits (N, 10).

    images: uint8 pixels 0-255 (as in the IDX files and torchvision's FashionMNIST.data) or floats in
    [0, 1] (as ToTensor() gives), shaped (N, 28, 28), (N, 1, 28, 28) or (N, 784); one image without
    the batch dimension works too. They are scaled and normalised exactly as the training run did.
    """

    def __init__(self, mlp, mean, std, config=None):
        super().__init__()
        self.mlp = mlp
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.classes = CLASSES
        self.config = config  # the run's TrainConfig, when loaded from a run

    def normalise(self, images):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"TrainedModel: images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype == torch.uint8:
            x = images.to(self.mean.device, torch.float32).div_(255)
        elif images.is_floating_point():
            x = images.to(self.mean.device, torch.float32, copy=True)  # normalised in place below
        else:
            raise TypeError(f"TrainedModel: images must be uint8 pixels (0-255) or floats in [0, 1], got {images.dtype}")
        s = tuple(x.shape)
        if s in ((784,), (28, 28)):
            x = x.reshape(1, 784)  # one image
        elif (len(s) == 2 and s[1] == 784) or s[1:] in ((28, 28), (1, 28, 28)):
            x = x.reshape(s[0], 784)
        else:
            raise ValueError(f"TrainedModel: images must be shaped (N, 28, 28), (N, 1, 28, 28) or (N, 784), or be "
                             f"one such image, got shape {list(s)}")
        # The same operations, in the same order and precision, as FashionMNIST.load (whose Python
        # float mean and std are cast to float32 for these float32 ops, as the buffers are).
        return x.sub_(self.mean).div_(self.std)

    def forward(self, images):
        return self.mlp(self.normalise(images))

    @torch.no_grad()
    def predict(self, images):
        """The predicted class index of each image, (N,) int64; ``model.classes[i]`` names it."""
        return self(images).argmax(-1)


def _load(run, weights):
    """(run folder, weights, the weights file's dict, mean, std) of a run, or a clear error. A path to
    checkpoint.pt or best.pt itself selects those weights."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    p = Path(run).expanduser()
    if p.is_file():
        by_file = {f: w for w, f in WEIGHTS.items()}
        if p.name not in by_file:
            raise FileNotFoundError(f"{p} is neither a run folder nor its checkpoint.pt or best.pt")
        weights, p = by_file[p.name], p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"{p} does not exist; give a run folder (<out_dir>/<timestamp>-<name>)")
    path = p / WEIGHTS[weights]
    if not path.is_file():
        if weights == "best":
            why = (" best.pt is written only by runs with a validation split (--val-split, e.g. 0.1); "
                   "use --weights last for the final weights")
        elif (p / "config.yaml").is_file():
            why = " The run stopped before its first checkpoint (written at the end of epoch 1)."
        else:
            why = " It is not a run folder of `fastmlp train`."
        raise FileNotFoundError(f"{p} has no {WEIGHTS[weights]}.{why}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path} is not a readable fastmlp checkpoint ({e})") from e
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise ConfigError(f"{path} is not a checkpoint of `fastmlp train` (it lacks the config and model entries)")
    # The normalisation: in checkpoint.pt; best.pt takes it from the run's checkpoint or summary.
    stats = ck.get("data")
    if not stats:
        for other in (p / WEIGHTS["last"], p / "summary.json"):
            try:
                stats = (torch.load(other, map_location="cpu", weights_only=False).get("data") if other.suffix == ".pt"
                         else json.loads(other.read_text()).get("normalisation"))
            except Exception:  # noqa: BLE001  (missing or unreadable: try the next, else say so below)
                stats = None
            if stats:
                break
    if not stats or "mean" not in stats or "std" not in stats:
        raise ConfigError(f"{p}: found no input normalisation (mean, std) in {path.name}, checkpoint.pt or summary.json")
    return p, weights, ck, float(stats["mean"]), float(stats["std"])


def load_model(run, weights="last", device="cpu", impl=None):
    """The trained model of a run folder of `fastmlp train`, in eval mode on ``device``.

    weights: "last" (checkpoint.pt, the latest weights) or "best" (best.pt: the epoch with the best
    validation accuracy, for runs with --val-split); ``run`` may also be one of those files.
    impl: "fastmlp" or "torch" to load the weights into that implementation instead of the run's
    (the two share their state_dict keys).
    """
    _, weights, ck, mean, std = _load(run, weights)
    return _model(ck, mean, std, WEIGHTS[weights], impl, device)


def _model(ck, mean, std, name, impl=None, device="cpu"):
    cfg = TrainConfig.from_dict(ck["config"], source=f"the config saved in {name}")
    device = torch.device(device)
    mlp = make_mlp(cfg, device, impl)
    # checkpoint.pt of an --ema run holds the trained weights and the average, which the run evaluated.
    mlp.load_state_dict(ck["ema"]["averaged"] if isinstance(ck.get("ema"), dict) else ck["model"])
    return TrainedModel(mlp, mean, std, cfg).to(device).eval()


@torch.no_grad()
def evaluate_run(run, weights="last", device="cpu", data_dir=None, plots=True, out=None):
    """Evaluates a run's weights on the Fashion-MNIST test set; returns (and writes into the run
    folder as evaluation-<weights>.json) test accuracy and loss, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted). The accuracy and loss are computed as
    the trainer computes them (batches of 4096, autocast as the run's --amp), so for the weights at
    the end of a run they equal the test_acc and test_loss of its last epoch."""
    run_dir, weights, ck, mean, std = _load(run, weights)
    outputs = [f"evaluation-{weights}.json", f"confusion-{weights}.png"]
    remove_stale_temp_files(run_dir, outputs)  # left by an evaluation killed while writing
    device = resolve_device(device)
    model = _model(ck, mean, std, WEIGHTS[weights], device=device)
    raw = load_fashion_mnist(data_dir)
    images, labels = raw["test_images"], raw["test_labels"].to(device)
    x = model.normalise(images.reshape(-1, 784))
    batches = ((x[i:i + EVAL_BATCH], labels[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH))
    correct, loss, pred = evaluation_sums(model.mlp, batches, device, AMP_DTYPES[model.config.amp], predictions=True)
    pred = torch.cat(pred) if pred else labels.new_empty(0)
    n = len(labels)
    confusion = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    confusion.index_put_((labels.cpu(), pred.cpu()), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    c, l = torch.stack([correct.float(), loss]).tolist()
    result = {
        "run_dir": str(run_dir), "weights": weights, "file": WEIGHTS[weights], "device": str(device),
        "ema": model.config.ema or None,  # the weights are the run's moving average (--ema)
        "n_test": n, "test_acc": c / n if n else math.nan, "test_loss": l / n if n else math.nan,
        "classes": list(CLASSES),
        "per_class_acc": dict(zip(CLASSES, per_class.tolist())),
        "confusion": confusion.tolist(),
    }
    json_path = run_dir / outputs[0]
    atomic_write_json(json_path, result)
    result["written"] = [str(json_path)]
    if plots:
        png = run_dir / outputs[1]
        atomic_write_bytes(png, _confusion_png(confusion, f"{run_dir.name} ({WEIGHTS[weights]}): test accuracy "
                                                           f"{result['test_acc']:.4f}"))
        result["written"].append(str(png))
    if out is not None:
        print(report(result), file=out)
    return result


def report(result):
    """The evaluation as text: accuracy and loss, per-class accuracy, the confusion matrix."""
    w = max(len(c) for c in CLASSES)
    avg = f", the moving average of the weights (--ema {result['ema']:g})" if result.get("ema") else ""
    lines = [f"{result['run_dir']} ({result['file']}{avg}): test accuracy {result['test_acc']:.4f}, "
             f"loss {result['test_loss']:.4f} on {result['n_test']} images",
             "", f"{'class':<{w}}  accuracy  most often mistaken for"]
    conf = result["confusion"]
    for i, name in enumerate(CLASSES):
        wrong = [(conf[i][j], j) for j in range(len(CLASSES)) if j != i and conf[i][j]]
        top = max(wrong) if wrong else None
        lines.append(f"{name:<{w}}  {result['per_class_acc'][name]:8.4f}  "
                     + (f"{CLASSES[top[1]]} ({top[0]})" if top else "-"))
    lines += ["", "confusion matrix (rows: true class, columns: predicted, in class order)"]
    lines += [" ".join(f"{v:5d}" for v in row) + f"  {CLASSES[i]}" for i, row in enumerate(conf)]
    if result.get("written"):
        lines += ["", "written: " + ", ".join(result["written"])]
    return "\n".join(lines)


def _confusion_png(confusion, title):
    from .plots import _plt  # noqa: PLC0415  (matplotlib is slow to import)

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    counts = confusion.numpy()
    im = ax.imshow(counts, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = counts.max() if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > top / 2 else "black")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _grey8(im):
    """im as 8-bit grey ("L"). Pillow's convert("L") clips 16-bit and 32-bit grey (modes I;16, I, F) at
    255 instead of scaling: a 16-bit PNG would come out all white. Those are scaled to 0-255 first:
    integers above 255 as 16-bit (/ 257), floats up to 1 as fractions (x 255)."""
    if im.mode.startswith("I;16"):
        im = im.convert("I")
    if im.mode in ("I", "F"):
        hi = im.getextrema()[1]
        scale = (255 / 65535 if hi > 255 else 1.0) if im.mode == "I" else (255.0 if hi <= 1.0 else 1.0)
        if scale != 1.0:
            im = im.point(lambda v: v * scale)
    return im.convert("L")


def load_images(paths, invert="auto"):
    """Image files as uint8 (N, 28, 28) in Fashion-MNIST's form: grey levels, the object light on a
    dark background, the whole picture fitted into 28 x 28.

    paths: file paths (or one). Each image is turned upright (EXIF), made grey (16-bit grey scaled
    to 8 bits), padded to a square with its border's mean grey
    (so the aspect ratio is kept) and resized with antialiasing. invert: "auto" inverts images whose
    border is light (a photo of a shoe on a white table), "yes" / "no" always / never.
    """
    if invert not in ("auto", "yes", "no"):
        raise ConfigError(f"invert must be auto, yes or no, got {invert!r}")
    try:
        from PIL import Image, ImageOps  # noqa: PLC0415  (Pillow comes with torchvision)
    except ImportError as e:
        raise RuntimeError("reading image files needs Pillow: pip install pillow") from e
    if isinstance(paths, (str, os.PathLike)):   # one file
        paths = [paths]
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        try:
            with Image.open(path) as im:
                im = _grey8(ImageOps.exif_transpose(im))
        except OSError as e:  # Pillow's UnidentifiedImageError is an OSError
            raise ConfigError(f"{path} is not an image file Pillow can read ({e})") from e
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width)
        border = torch.cat([t[0], t[-1], t[:, 0], t[:, -1]]).float().mean().item()
        side = max(im.width, im.height)
        square = Image.new("L", (side, side), int(round(border)))
        square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        small = square if side == 28 else square.resize((28, 28), Image.Resampling.LANCZOS)
        if invert == "yes" or (invert == "auto" and border > 127.5):
            small = ImageOps.invert(small)
        out.append(torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(28, 28))
    return torch.stack(out) if out else torch.empty(0, 28, 28, dtype=torch.uint8)


@torch.no_grad()
def predict_files(run, paths, weights="last", device="cpu", invert="auto", top=3, out=None):
    """[(path, [(class name, probability), ...top classes])] for image files (see load_images)."""
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(CLASSES):
        raise ConfigError(f"top must be a whole number from 1 to {len(CLASSES)} (the classes to list), got {top!r}")
    model = load_model(run, weights, resolve_device(device))
    images = load_images(paths, invert)
    probs = torch.softmax(model(images).float(), dim=-1).cpu()
    result = []
    for path, p in zip(paths, probs):
        values, idx = p.topk(top)
        result.append((str(path), [(CLASSES[i], v) for v, i in zip(values.tolist(), idx.tolist())]))
    if out is not None:
        w = max(len(r[0]) for r in result) if result else 0
        for path, best in result:
            print(f"{path:<{w}}  " + ", ".join(f"{name} {p:.1%}" for name, p in best), file=out)
    return result


class _Exported(nn.Module):
    """What export_model traces: one fixed input format, plain torch ops only."""

    def __init__(self, model):
        super().__init__()
        self.mlp = model.mlp
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())

    def forward(self, images):
        x = images.reshape(-1, 784)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div(255)
        return self.mlp(x.sub(self.mean).div(self.std))


EXPORT_INPUTS = {
    "float": "float32 (N, 1, 28, 28) in [0, 1], as torchvision's ToTensor() gives",
    "pixels": "uint8 (N, 28, 28) pixels 0-255, as in the IDX files",
}


EXPORT_FORMATS = ("pt2", "onnx")


def export_model(run, path=None, weights="last", input="float", format="pt2"):
    """Writes a run's model as a program that needs neither fastmlp nor the training code: a
    torch.export program (``format="pt2"``: ``torch.export.load(path).module()(images)`` gives the
    logits (N, 10) for a batch of any size, with torch alone) or an ONNX model (``format="onnx"``,
    for onnxruntime and other ONNX runtimes: its input is named "images", its output the logits; it
    needs the onnx and onnxscript packages to write).

    The program holds the run's weights in torch's own ops (nn.Linear and activations: the two
    implementations share their weights) and its input normalisation, and takes ``input``:
    "float" (N, 1, 28, 28) float32 in [0, 1] or "pixels" (N, 28, 28) uint8. Written atomically to
    ``path`` (default: <run>/model-<weights>.<format>); returns the path.
    """
    if input not in EXPORT_INPUTS:
        raise ConfigError(f"input must be one of {', '.join(EXPORT_INPUTS)}, got {input!r}")
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if format == "onnx":
        try:
            for package in ("onnx", "onnxscript"):  # torch.onnx.export's dependencies
                importlib.import_module(package)
        except ImportError as e:
            raise ConfigError(f"ONNX export needs the onnx and onnxscript packages ({e}): pip install onnx "
                              "onnxscript, or pip install 'fastmlp[onnx]'") from None
    run_dir, weights, ck, mean, std = _load(run, weights)
    module = _Exported(_model(ck, mean, std, WEIGHTS[weights], impl="torch")).eval()
    example = (torch.rand(2, 1, 28, 28) if input == "float"
               else torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8))
    dynamic = {"images": {0: torch.export.Dim("batch")}}
    if format == "onnx":
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=["images"], output_names=["logits"], verbose=False)
        data = program.model_proto.SerializeToString()
    else:
        buf = io.BytesIO()
        torch.export.save(torch.export.export(module, (example,), dynamic_shapes=dynamic), buf)
        data = buf.getvalue()
    path = Path(path) if path is not None else run_dir / f"model-{weights}.{format}"
    atomic_write_bytes(path, data)
    return path
