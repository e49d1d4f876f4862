import gzip
import os
from pathlib import Path

import pytest
import torch

from fastmlp.data import FILES, DataError, FashionMNIST, augment, fingerprint, load_fashion_mnist, read_idx

REPO = Path(__file__).resolve().parent.parent


def real_data_dir():
    """FASTMLP_DATA, else ../shared/data/fashion-mnist; a missing dataset fails, never skips."""
    d = os.environ.get("FASTMLP_DATA") or str(REPO.parent / "shared" / "data" / "fashion-mnist")
    if not (Path(d) / "FashionMNIST" / "raw").is_dir():
        pytest.fail(f"Fashion-MNIST not found at {d}: set FASTMLP_DATA to the folder holding FashionMNIST/raw/")
    return d


def idx_bytes(t, magic_ndim=None):
    ndim = t.dim() if magic_ndim is None else magic_ndim
    header = (0x0800 | ndim).to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in t.shape)
    return header + t.to(torch.uint8).contiguous().numpy().tobytes()


def synthetic_tensors(n_train=20, n_test=10):
    """The four tensors write_dataset writes (uint8 images, int64 labels): random, with image 0 of
    each split a ramp whose pixel (row r, column c) is (28 r + c) mod 256, so pixel order shows."""
    g = torch.Generator().manual_seed(0)
    out = {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_labels": torch.randint(0, 10, (n_train,), generator=g),
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "test_labels": torch.randint(0, 10, (n_test,), generator=g),
    }
    ramp = (torch.arange(784) % 256).to(torch.uint8).view(28, 28)
    for k in ("train_images", "test_images"):
        if len(out[k]):
            out[k][0] = ramp
    return out


def write_dataset(root, n_train=20, n_test=10, gz=False, overrides=None):
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    blobs = {k: idx_bytes(t) for k, t in synthetic_tensors(n_train, n_test).items()}
    blobs.update(overrides or {})
    for k, data in blobs.items():
        if gz:
            with gzip.open(raw / (FILES[k] + ".gz"), "wb") as f:
                f.write(data)
        else:
            (raw / FILES[k]).write_bytes(data)
    return raw


def test_fingerprint_tells_contents_apart(tmp_path):
    # The same data from plain and gzipped files gives one fingerprint; one label changed (same size,
    # same pixels, same mean) gives another. FashionMNIST.load records it for the checkpoints.
    write_dataset(tmp_path / "raw")
    write_dataset(tmp_path / "gz", gz=True)
    relabelled = synthetic_tensors()
    relabelled["train_labels"][3] = (relabelled["train_labels"][3] + 1) % 10
    write_dataset(tmp_path / "relabelled", overrides={"train_labels": idx_bytes(relabelled["train_labels"])})
    prints = {name: fingerprint(load_fashion_mnist(tmp_path / name)) for name in ("raw", "gz", "relabelled")}
    assert prints["raw"] == prints["gz"] != prints["relabelled"]
    assert len(prints["raw"]) == 32
    assert FashionMNIST.load(tmp_path / "gz", val_split=0.1).digest == prints["raw"]


def test_synthetic_roundtrip_raw_and_gz(tmp_path):
    # What was written is what loads: every pixel of every image in its place, each label with its
    # image, from plain and from gzipped files.
    expected = synthetic_tensors()
    for gz in (False, True):
        root = tmp_path / ("gz" if gz else "raw")
        write_dataset(root, gz=gz)
        d = load_fashion_mnist(root)
        assert d["train_images"].shape == (20, 28, 28) and d["train_images"].dtype == torch.uint8
        assert d["train_labels"].shape == (20,) and d["train_labels"].dtype == torch.int64
        assert d["test_images"].shape == (10, 28, 28)
        assert d.keys() == expected.keys()
        for k, t in expected.items():
            assert d[k].dtype == t.dtype and torch.equal(d[k], t), (gz, k)
        # Row-major pixels: image 0's first row holds 0, 1, 2, ..., its second row starts at 28.
        for k in ("train_images", "test_images"):
            assert d[k][0, 0, :4].tolist() == [0, 1, 2, 3] and d[k][0, 1, 0] == 28 and d[k][0, 27, 27] == 783 % 256


def test_bad_magic_names_file(tmp_path):
    good = idx_bytes(torch.zeros(20, dtype=torch.uint8))
    raw = write_dataset(tmp_path, overrides={"train_labels": b"\x00\x00\x08\x03" + good[4:]})
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has a bad magic number 0x00000803"):
        load_fashion_mnist(tmp_path)
    assert str(raw) in str(pytest.raises(DataError, load_fashion_mnist, tmp_path).value)


def test_truncated_file_names_file(tmp_path):
    full = idx_bytes(torch.zeros(10, 28, 28))
    write_dataset(tmp_path, overrides={"test_images": full[:-100]})
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte has the wrong length"):
        load_fashion_mnist(tmp_path)
    write_dataset(tmp_path, overrides={"test_images": full[:10]})
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is truncated"):
        load_fashion_mnist(tmp_path)


def test_truncated_gz_names_file(tmp_path):
    raw = write_dataset(tmp_path, gz=True)
    p = raw / (FILES["train_images"] + ".gz")
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_fashion_mnist(tmp_path)


def test_count_mismatch_names_both_files(tmp_path):
    write_dataset(tmp_path, overrides={"train_labels": idx_bytes(torch.zeros(19, dtype=torch.uint8))})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds 20 images but .*train-labels-idx1-ubyte holds 19"):
        load_fashion_mnist(tmp_path)


def test_label_out_of_range(tmp_path):
    write_dataset(tmp_path, overrides={"test_labels": idx_bytes(torch.full((10,), 12))})
    with pytest.raises(DataError, match="label 12"):
        load_fashion_mnist(tmp_path)


def test_read_idx_checks_ndim(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(idx_bytes(torch.zeros(3, 2)))
    assert read_idx(p, 2).shape == (3, 2)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(p, 3)


def test_missing_explicit_root_lists_files_and_never_downloads(tmp_path, monkeypatch):
    import fastmlp.data as data

    monkeypatch.setattr(data, "_download", lambda root: pytest.fail("must not download into an explicit root"))
    raw = write_dataset(tmp_path)
    (raw / FILES["test_labels"]).unlink()
    monkeypatch.setenv("FASTMLP_DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        load_fashion_mnist()
    msg = str(e.value)
    assert str(raw / FILES["test_labels"]) in msg and FILES["train_images"] not in msg


def test_missing_cache_tries_download_then_says_where(tmp_path, monkeypatch):
    import fastmlp.data as data

    calls = []

    def offline(root):
        calls.append(root)
        raise OSError("network unreachable")

    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataError, match="network unreachable") as e:
        load_fashion_mnist()
    assert calls == [tmp_path / "fastmlp"]
    for name in FILES.values():
        assert str(tmp_path / "fastmlp" / "FashionMNIST" / "raw" / name) in str(e.value)


def test_data_dir_argument_wins_over_env(tmp_path, monkeypatch):
    write_dataset(tmp_path / "a", n_train=7)
    monkeypatch.setenv("FASTMLP_DATA", str(tmp_path / "nowhere"))
    assert load_fashion_mnist(tmp_path / "a")["train_images"].shape[0] == 7


def test_device_dataset_split_shuffle_and_normalisation(tmp_path):
    write_dataset(tmp_path, n_train=100)
    ds = FashionMNIST.load(tmp_path, val_split=0.2)
    assert len(ds.train) == 80 and len(ds.val) == 20 and len(ds.test) == 10
    assert ds.train.x.shape == (80, 784) and ds.train.x.dtype == torch.float32
    assert abs(ds.train.x.mean().item()) < 1e-4 and abs(ds.train.x.std().item() - 1) < 1e-2
    # The values: train + val are the training files' images (row-major pixels) and labels, split,
    # each image still with its label; the test split is the test files' in file order; all are
    # normalised with the mean and std of the training split's pixels.
    raw = synthetic_tensors(100, 10)

    def pixels(split):  # back to the uint8 pixels
        return torch.round((split.x.double() * ds.std + ds.mean) * 255).to(torch.uint8)

    def rows(px, labels):
        return sorted((tuple(r.tolist()), int(y)) for r, y in zip(px.reshape(len(px), 784), labels))

    assert sorted(rows(pixels(ds.train), ds.train.y) + rows(pixels(ds.val), ds.val.y)) == rows(
        raw["train_images"], raw["train_labels"])
    train_px = pixels(ds.train).double() / 255
    assert ds.mean == pytest.approx(train_px.mean().item()) and ds.std == pytest.approx(train_px.std().item())
    expect_test = ((raw["test_images"].double() / 255 - ds.mean) / ds.std).reshape(10, 784).float()
    torch.testing.assert_close(ds.test.x, expect_test)
    assert torch.equal(ds.test.y, raw["test_labels"])
    p0, p0b, p1 = ds.train.permutation(3, 0), ds.train.permutation(3, 0), ds.train.permutation(3, 1)
    assert torch.equal(p0, p0b) and not torch.equal(p0, p1)
    assert torch.equal(p0.sort().values, torch.arange(80))
    sizes = [len(x) for x, _ in ds.train.batches(32, p0)]
    assert sizes == [32, 32, 16]
    # Resuming at batch 1 gives the same remaining batches.
    rest = list(ds.train.batches(32, p0, start=1))
    assert torch.equal(rest[0][0], list(ds.train.batches(32, p0))[1][0])
    with pytest.raises(ValueError, match="val_split"):
        FashionMNIST.load(tmp_path, val_split=1.5)


def test_real_data_loads_without_writing(tmp_path):
    src = Path(real_data_dir()) / "FashionMNIST" / "raw"
    # A copy made of symlinks, so any file the loader wrote next to the data would show up.
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in src.iterdir():
        (raw / f.name).symlink_to(f)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    ds = FashionMNIST.load(tmp_path, val_split=0.1)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert len(ds.train) == 54000 and len(ds.val) == 6000 and len(ds.test) == 10000
    assert abs(ds.mean - 0.2861) < 2e-3 and abs(ds.std - 0.3528) < 2e-3
    assert torch.bincount(ds.test.y, minlength=10).tolist() == [1000] * 10


def test_missing_files_one_level_off_suggest_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    raw = write_dataset(tmp_path / "root")
    for given in (raw, raw.parent, tmp_path):
        with pytest.raises(DataError, match=f"The four files are in {raw}: use --data-dir {tmp_path / 'root'} "):
            load_fashion_mnist(given)
    monkeypatch.setenv("FASTMLP_DATA", str(raw))
    with pytest.raises(DataError, match=f"use FASTMLP_DATA={tmp_path / 'root'} "):
        load_fashion_mnist()
    flat = tmp_path / "flat"  # the four files, but not in a FashionMNIST/raw/ folder
    flat.mkdir()
    for f in raw.iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match=f"The four files are in {flat}, but fastmlp reads them from <root>/FashionMNIST/raw/"):
        load_fashion_mnist(flat)


def augment_reference(img, dy, dx, mirrored, fill):
    """One 28 x 28 image, mirrored left-right if asked, then moved down by dy and right by dx."""
    src = img.flip(-1) if mirrored else img
    out = torch.full_like(img, fill)
    out[max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = \
        src[max(-dy, 0):28 - max(dy, 0), max(-dx, 0):28 - max(dx, 0)]
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("shift, flip", [(2, False), (0, True), (3, True)])
def test_augment_moves_and_mirrors_each_image(shift, flip, device):
    torch.manual_seed(0)
    x = torch.randn(64, 784, device=device)
    fill = -0.8
    y = augment(x, shift, flip, fill)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    seen_shifts, n_mirrored = set(), 0
    for i in range(x.shape[0]):
        img, out = x[i].view(28, 28).cpu(), y[i].view(28, 28).cpu()
        # Find the one (dy, dx, mirrored) that the output is; the reference says what each gives.
        matches = [(dy, dx, m) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
                   for m in ((False, True) if flip else (False,))
                   if torch.equal(out, augment_reference(img, dy, dx, m, fill))]
        assert len(matches) == 1, f"image {i}: output is no single shift/mirror of its input"
        seen_shifts.add(matches[0][:2])
        n_mirrored += matches[0][2]
    if shift:
        assert len(seen_shifts) >= min(64, (2 * shift + 1) ** 2) // 3  # the offsets vary from image to image
    assert (16 <= n_mirrored <= 48) if flip else n_mirrored == 0
    # The generator of x's device drives it: the same seed gives the same batch.
    torch.manual_seed(1)
    a = augment(x, shift, flip, fill)
    torch.manual_seed(1)
    assert torch.equal(a, augment(x, shift, flip, fill))


def test_augment_offsets_are_uniform_and_off_is_the_identity():
    x = torch.randn(3, 784)
    assert augment(x, 0, False) is x and augment(x[:0], 2, True).shape == (0, 784)
    # One lit pixel in the middle: where it lands is the image's offset.
    torch.manual_seed(0)
    n, s = 20000, 2
    x = torch.zeros(n, 784)
    x[:, 14 * 28 + 14] = 1.0
    pos = augment(x, s, False).argmax(1)
    dy, dx = pos // 28 - 14, pos % 28 - 14
    counts = torch.bincount(((dy + s) * (2 * s + 1) + dx + s), minlength=(2 * s + 1) ** 2).float()
    assert counts.numel() == 25 and (counts - n / 25).abs().max() < 5 * (n / 25) ** 0.5
    assert dy.abs().max() == s and dx.abs().max() == s
