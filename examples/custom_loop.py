"""fastmlp in your own training loop, without the CLI: the pieces `fastmlp train` is built from.

    python examples/custom_loop.py                        # 3 epochs of the default MLP, ~0.89 test accuracy
    python examples/custom_loop.py --amp bf16 --ema 0.999 --device cuda
    python examples/custom_loop.py --convert              # a plain torch model, converted by fastmlp.convert

Fashion-MNIST comes from --data-dir, else $FASTMLP_DATA, else a cache folder (downloaded there
with torchvision when missing). The loop: fastmlp.nn.MLP (fused linear + activation and fastmlp's
dropout) or a torch nn.Sequential converted in place, fastmlp.optim.AdamW (one fused multi-tensor
step), a one-cycle schedule, autocast in bf16 or fp16 (fp16 with torch's GradScaler, which the fused
step reads without a host sync), and fastmlp.optim.EMA, whose averaged weights are evaluated.
"""

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# From a checkout whose extension was built in place (scripts/install.sh), without pip install.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastmlp  # noqa: E402
from fastmlp.data import FashionMNIST  # noqa: E402

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(convert, device):
    if not convert:
        return fastmlp.nn.MLP([784, 512, 512, 10], activation="gelu", dropout=0.2).to(device)
    model = nn.Sequential(nn.Linear(784, 512), nn.GELU(), nn.Dropout(0.2),
                          nn.Linear(512, 512), nn.GELU(), nn.Dropout(0.2), nn.Linear(512, 10)).to(device)
    return fastmlp.convert(model)  # Linear + GELU -> FusedLinear, Dropout -> fastmlp's; same parameters


@torch.no_grad()
def accuracy(model, split, amp):
    model.eval()
    correct = 0
    for x, y in split.batches(4096):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            correct += (model(x).argmax(-1) == y).sum().item()
    model.train()
    return correct / len(split)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--amp", choices=list(AMP), default="off")
    ap.add_argument("--ema", type=float, default=0.0, help="EMA decay (0 = off), e.g. 0.999")
    ap.add_argument("--convert", action="store_true", help="start from a plain torch model and convert it")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-subset", type=int, default=0, help="train on the first N images only (0 = all)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    data = FashionMNIST.load(args.data_dir, device=args.device, train_subset=args.train_subset)
    model = build_model(args.convert, args.device)
    opt = fastmlp.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * data.train.num_batches(args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    amp = AMP[args.amp]
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.amp == "fp16")
    ema = fastmlp.optim.EMA(model, decay=args.ema) if args.ema else None

    for epoch in range(args.epochs):
        t0, total, n = time.perf_counter(), 0.0, 0
        for x, y in data.train.batches(args.batch_size, data.train.permutation(0, epoch)):
            with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)  # the fused step reads the scale and skips a step with an inf gradient
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update()
            total, n = total + loss.detach(), n + 1
        with ema.average_parameters() if ema is not None else contextlib.nullcontext():
            acc = accuracy(model, data.test, amp)
        print(f"epoch {epoch + 1}/{args.epochs}  train loss {float(total) / n:.4f}  test acc {acc:.4f}"
              f"{' (EMA weights)' if ema is not None else ''}  {time.perf_counter() - t0:.2f} s", flush=True)
    return acc


if __name__ == "__main__":
    main()
