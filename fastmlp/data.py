"""Fashion-MNIST from the standard IDX files, held whole on the training device.

Layout is torchvision's: ``<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
(uncompressed or ``.gz``). The root is ``data_dir`` if given, else ``$FASTMLP_DATA``, else a cache
folder (``$XDG_CACHE_HOME/fastmlp`` or ``~/.cache/fastmlp``). Only the cache folder is ever
downloaded into or written to: an explicit root may be read-only (CI's shared copy is), and a
missing file there is an error, never a silent download.
"""

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DataError", "FILES", "DeviceDataset", "FashionMNIST", "augment", "resolve_root", "read_idx", "load_fashion_mnist"]

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")



def _magic(ndim):
    # IDX magic number: two zero bytes, the element type (0x08 = uint8), then the number of dimensions.
    return 0x00000800 | ndim


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""


def cache_root():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmlp"


def resolve_root(data_dir=None):
    """(root, explicit): the dataset root and whether the user chose it (so it is never written to)."""
    if data_dir:
        return Path(data_dir).expanduser(), True
    env = os.environ.get("FASTMLP_DATA")
    if env:
        return Path(env).expanduser(), True
    return cache_root(), False


def _find(raw, name):
    for candidate in (raw / name, raw / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path, ndim):
    """The uint8 tensor stored in one IDX file (raw or .gz), checked against its own header."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}. Replace it with a fresh copy of the file.") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte IDX header.")
    magic = int.from_bytes(data[:4], "big")
    if magic != _magic(ndim):
        raise DataError(
            f"{path} has a bad magic number 0x{magic:08x}: expected 0x{_magic(ndim):08x} (an IDX file of uint8 "
            f"with {ndim} dimension{'s' if ndim > 1 else ''}). The file is corrupt or is not the file its name says."
        )
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if len(data) != header + count:
        raise DataError(
            f"{path} has the wrong length: its header says {'x'.join(map(str, dims))} values "
            f"({header + count} bytes with the header), but the file holds {len(data)} bytes. It is truncated or corrupt."
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*dims)


def _has_all(folder):
    try:
        return all(_find(folder, n) is not None for n in FILES.values())
    except OSError:
        return False


def _subdirs(folder, limit=64):
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())[:limit]
    except OSError:
        return []


def _suggest_root(root):
    """(root to use, where the files are) when the four files sit near ``root`` in the expected
    layout, a level or two off (``--data-dir .../FashionMNIST/raw``, ``.../FashionMNIST``, or the
    folder above the root); (None, folder) when they sit in a folder of another layout; else None."""
    near = [root.parent, root.parent.parent] + _subdirs(root)
    for cand in near:
        if cand != root and _has_all(cand / "FashionMNIST" / "raw"):
            return cand, cand / "FashionMNIST" / "raw"
    for folder in [root, root / "raw"] + [d for d in _subdirs(root) if d.name.lower() in ("raw", "fashionmnist")]:
        if _has_all(folder):
            return None, folder
    return None


def _missing_message(raw, missing, explicit, source="--data-dir"):
    root = raw.parent.parent
    lines = [f"Fashion-MNIST files are missing from {raw}:"]
    lines += [f"    {raw / n}   (or {n}.gz)" for n in missing]
    hint = _suggest_root(root) if explicit else None
    if hint and hint[0] is not None:
        use = f"--data-dir {hint[0]}" if source == "--data-dir" else f"FASTMLP_DATA={hint[0]}"
        lines.append(f"The four files are in {hint[1]}: use {use} (the folder that holds "
                     "FashionMNIST/raw/, not a folder inside it or above it).")
    elif hint:
        lines.append(f"The four files are in {hint[1]}, but fastmlp reads them from <root>/FashionMNIST/raw/: "
                     f"move them to {raw}, or to a FashionMNIST/raw/ folder under another root.")
    elif explicit and not root.exists():
        lines.append(f"(The folder {root} does not exist.)")
    lines.append(
        "Put the four standard IDX files there (from https://github.com/zalandoresearch/fashion-mnist), or point "
        "--data-dir / FASTMLP_DATA at a folder that holds FashionMNIST/raw/."
    )
    if explicit:
        lines.append("Nothing is downloaded into a folder you chose; unset FASTMLP_DATA and --data-dir to download into "
                     f"the cache folder {cache_root()}.")
    return "\n".join(lines)


def _download(root):
    import torchvision  # only needed for the download

    root.mkdir(parents=True, exist_ok=True)
    torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    torchvision.datasets.FashionMNIST(str(root), train=False, download=True)


def load_fashion_mnist(data_dir=None, download=True):
    """{"train_images": (60000, 28, 28) uint8, "train_labels": (60000,) int64, "test_images", "test_labels"}.

    Raises DataError naming the file when one is missing, corrupt, or disagrees with its partner.
    """
    root, explicit = resolve_root(data_dir)
    source = "--data-dir" if data_dir else "FASTMLP_DATA"
    raw = root / "FashionMNIST" / "raw"
    paths = {k: _find(raw, n) for k, n in FILES.items()}
    missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing and download and not explicit:
        try:
            _download(root)
        except Exception as e:  # noqa: BLE001  (any failure: offline, no torchvision, a mirror down)
            raise DataError(f"downloading Fashion-MNIST through torchvision failed ({e}).\n"
                            + _missing_message(raw, missing, explicit)) from e
        paths = {k: _find(raw, n) for k, n in FILES.items()}
        missing = [FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(_missing_message(raw, missing, explicit, source))

    out = {}
    for split in ("train", "test"):
        ip, lp = paths[f"{split}_images"], paths[f"{split}_labels"]
        images, labels = read_idx(ip, 3), read_idx(lp, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{ip} holds {images.shape[0]} images but {lp} holds {labels.shape[0]} labels; "
                            "the pair must match. One of the two files is from another dataset or truncated.")
        if tuple(images.shape[1:]) != (28, 28):
            raise DataError(f"{ip} holds images of {tuple(images.shape[1:])} pixels, expected 28 x 28.")
        if labels.numel() and int(labels.max()) > 9:
            raise DataError(f"{lp} holds label {int(labels.max())}; Fashion-MNIST labels are 0-9.")
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels.long()
    return out


class DeviceDataset:
    """Inputs (N, 784) float and labels (N,) int64, all on one device; batches are index slices."""

    def __init__(self, x, y):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"DeviceDataset: {x.shape[0]} inputs but {y.shape[0]} labels")
        self.x, self.y = x, y

    def __len__(self):
        return self.x.shape[0]

    def permutation(self, seed, epoch):
        """The epoch's shuffle, a pure function of (seed, epoch), so a resumed run sees the same order."""
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.randperm(len(self), generator=g).to(self.x.device)

    def batches(self, batch_size, order=None, start=0, min_size=1):
        """Yields (x, y) batches of batch_size (the last may be smaller), from batch index ``start``.
        A last batch of fewer than ``min_size`` samples is dropped (BatchNorm cannot train on 1)."""
        n = self._used(batch_size, min_size)
        for i in range(start * batch_size, n, batch_size):
            if order is None:
                yield self.x[i:i + batch_size], self.y[i:i + batch_size]
            else:
                idx = order[i:i + batch_size]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)

    def num_batches(self, batch_size, min_size=1):
        return -(-self._used(batch_size, min_size) // batch_size)

    def dropped(self, batch_size, min_size=1):
        """How many samples ``batches(batch_size, min_size=min_size)`` leaves out (the short last batch)."""
        return len(self) - self._used(batch_size, min_size)

    def _used(self, batch_size, min_size):
        n = len(self)
        last = n % batch_size
        return n - last if 0 < last < min_size else n


def augment(x, max_shift=0, flip=False, fill=0.0):
    """Randomly shifted and flipped copies of a batch of 28 x 28 images x, (N, 784) row-major, on x's
    device: each image moves by dx, dy drawn uniformly from [-max_shift, max_shift] (what leaves the
    frame is cut, what enters is ``fill``: the normalised value of a black pixel) and, with flip, half
    of them (each with probability 1/2) are mirrored left-right. One gather for the batch; the random
    numbers come from torch's generator of x's device, so a seeded run, and a resumed one, repeat them."""
    n = x.shape[0]
    if (not max_shift and not flip) or n == 0:
        return x
    dev = x.device
    side = 28 + 2 * max_shift
    padded = torch.nn.functional.pad(x.reshape(n, 28, 28), (max_shift,) * 4, value=fill) if max_shift else x
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), device=dev)
    ar = torch.arange(28, device=dev)
    cols = ar
    if flip:
        cols = torch.where(torch.rand(n, 1, device=dev) < 0.5, ar.flip(0), ar)
    # Image i's window of the padded batch starts at (i, off_y, off_x): one flat gather (take) for
    # the batch, 2x faster here than advanced indexing with three index tensors.
    start = torch.arange(n, device=dev) * (side * side) + off[:, 0] * side + off[:, 1]
    out = padded.take(start[:, None, None] + (ar * side)[None, :, None] + cols.reshape(-1, 1, 28))
    return out.reshape(n, 784)


def fingerprint(raw):
    """A digest of the dataset's contents (every image and label of both splits, as loaded: the same
    for the .gz and plain files), which a checkpoint records so that a resume can tell it has the same
    data (~0.2 s for Fashion-MNIST on the 2-core VM)."""
    h = hashlib.blake2b(digest_size=16)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        h.update(memoryview(raw[key].contiguous().numpy()))
    return h.hexdigest()


@dataclass
class FashionMNIST:
    """The three splits on one device, normalised with the training split's mean and std; ``digest``:
    the loaded files' fingerprint (None for data built by hand)."""

    train: DeviceDataset
    val: DeviceDataset | None
    test: DeviceDataset
    mean: float
    std: float
    digest: str | None = None

    @classmethod
    def load(cls, data_dir=None, device="cpu", val_split=0.0, train_subset=0, split_seed=12345,
             dtype=torch.float32, download=True):
        if not 0.0 <= float(val_split) < 1.0:
            raise ValueError(f"val_split must be a fraction in [0, 1), got {val_split!r}")
        raw = load_fashion_mnist(data_dir, download=download)
        x, y = raw["train_images"].reshape(-1, 784), raw["train_labels"]
        n_val = int(round(len(x) * float(val_split)))
        xv = yv = None
        if n_val:
            # A fixed split (not the run's seed) so runs with different seeds validate on the same images.
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
            xv, yv = x[perm[:n_val]], y[perm[:n_val]]
            x, y = x[perm[n_val:]], y[perm[n_val:]]
        if train_subset:
            if train_subset < 0:
                raise ValueError(f"train_subset must be >= 0 (0 = all), got {train_subset}")
            x, y = x[:train_subset], y[:train_subset]
        xf = x.to(torch.float64).div_(255)
        mean, std = xf.mean().item(), xf.std().item()

        def prep(images, labels):
            t = images.to(device=device, dtype=torch.float32).div_(255).sub_(mean).div_(std).to(dtype)
            return DeviceDataset(t, labels.to(device))

        tx, ty = raw["test_images"].reshape(-1, 784), raw["test_labels"]
        return cls(prep(x, y), prep(xv, yv) if n_val else None, prep(tx, ty), mean, std, fingerprint(raw))
