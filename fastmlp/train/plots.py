"""PNG plots of a run, written atomically into the run folder."""

import io
from pathlib import Path

from .checkpoint import atomic_write_bytes

__all__ = ["write_plots", "plot_lr_find", "plot_runs"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines and SSH sessions
    import matplotlib.pyplot as plt

    return plt



def _line(points, style="-"):
    """A line style that shows a lone point too (a line through one point draws nothing)."""
    return style if len(points) > 1 else "o" + style

def _save(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    fig.clf()


def write_plots(run_dir, steps, epochs, monitor):
    """steps: [{"step", "loss", "lr"}]; epochs: the metrics.csv rows; monitor: Monitor records.
    Returns the written paths."""
    plt = _plt()
    run_dir = Path(run_dir)
    out = []
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.6, alpha=0.5, label="train loss (step)")
        if epochs:
            ax.plot([e["global_step"] for e in epochs], [e["train_loss"] for e in epochs], "o-", label="train loss (epoch mean)")
            # Evaluation losses are plain cross-entropy in eval mode; the train loss is the training
            # objective (label smoothing, dropout on), which sits above it even without overfitting.
            for key, marker, name in (("val_loss", "s--", "validation"), ("test_loss", "^--", "test")):
                pts = [(e["global_step"], e[key]) for e in epochs if e.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker, label=f"{name} cross-entropy (eval mode)")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
        _save(fig, run_dir / "loss.png"); out.append(run_dir / "loss.png")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot([s["step"] for s in steps], [s["lr"] for s in steps])
        ax.set_xlabel("step"), ax.set_ylabel("learning rate"), ax.grid(alpha=0.3)
        _save(fig, run_dir / "lr.png"); out.append(run_dir / "lr.png")
        plt.close(fig)
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 4))
        ep = [e["epoch"] for e in epochs]
        ax.plot(ep, [e["test_acc"] for e in epochs], "o-", label="test")
        if any(e.get("val_acc") is not None for e in epochs):
            ax.plot(ep, [e["val_acc"] for e in epochs], "s-", label="validation")
        if any(e.get("train_acc") is not None for e in epochs):  # (absent in runs from older versions)
            ax.plot(ep, [e.get("train_acc") for e in epochs], "^--", label="train (dropout on)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("epoch"), ax.set_ylabel("accuracy"), ax.legend(), ax.grid(alpha=0.3)
        _save(fig, run_dir / "accuracy.png"); out.append(run_dir / "accuracy.png")
        plt.close(fig)
    if monitor:
        keys = sorted({k for r in monitor for k in r if k != "step"})
        panels = [("grad_norm", "gradient norm (before clipping)", "log"),
                  ("update_ratio", "update / weight", "log"),
                  ("dead_frac", "dead-unit fraction", "linear"), ("act_mean", "activation mean", "linear"),
                  ("act_std", "activation std", "linear")]
        fig, axes = plt.subplots(2, 3, figsize=(15, 7))
        axes.flat[-1].axis("off")
        for ax, (suffix, title, scale) in zip(axes.flat, panels):
            for k in [k for k in keys if k.endswith("/" + suffix)]:
                pts = [(r["step"], r[k]) for r in monitor if k in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], _line(pts), label=k.rsplit("/", 1)[0])
            ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3)
            if scale == "log" and any(ax.get_lines()):
                ax.set_yscale("log")
            if ax.get_lines():
                ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, run_dir / "layers.png"); out.append(run_dir / "layers.png")
        plt.close(fig)
        # The per-layer gradient norms also get a plot of their own, the one most often looked at.
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in [k for k in keys if k.endswith("/grad_norm")]:
            pts = [(r["step"], r[k]) for r in monitor if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], _line(pts), label=k.rsplit("/", 1)[0])
        ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("gradient L2 norm (before clipping)")
        ax.grid(alpha=0.3), ax.legend()
        _save(fig, run_dir / "grad_norms.png"); out.append(run_dir / "grad_norms.png")
        plt.close(fig)
    return out


def plot_runs(path, curves):
    """One figure comparing runs: test accuracy (and validation accuracy, dashed, where there is
    one) and the train loss per epoch. curves: [(label, metrics.csv rows as dicts of floats)]."""
    plt = _plt()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, rows in curves:
        ep = [r["epoch"] for r in rows]
        line, = acc.plot(ep, [r["test_acc"] for r in rows], "o-", ms=3, label=label)
        val = [(r["epoch"], r["val_acc"]) for r in rows if r.get("val_acc") is not None]
        if val:
            acc.plot(*zip(*val), _line(val, "--"), color=line.get_color(), alpha=0.7)
        loss.plot(ep, [r["train_loss"] for r in rows], "o-", ms=3, color=line.get_color())
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
    acc.set_ylabel("test accuracy (dashed: validation)"), loss.set_ylabel("train loss (training objective)")
    loss.set_yscale("log")
    fig.legend(*acc.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, bbox_to_anchor=(0.5, -0.02 - 0.035 * ((len(curves) + 1) // 2)))
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def plot_lr_find(path, lrs, losses, smoothed, suggestion):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    if suggestion:
        ax.axvline(suggestion, color="r", ls="--", label=f"suggested lr {suggestion:.2e}")
    if smoothed:
        ax.set_ylim(min(smoothed) * 0.9, max(smoothed[0] * 1.5, min(smoothed) * 1.5))
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss"), ax.grid(alpha=0.3), ax.legend()
    _save(fig, Path(path))
    plt.close(fig)
