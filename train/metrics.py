"""Training metrics: a JSONL log, TensorBoard event files, a progress bar, loss and per-layer plots, and MFU.

Throughput and MFU have one definition here: MFU = model FLOPs per token (the model
family's ``flops_per_token``: 6 x matmul parameters + causal attention) x tokens/s
divided by the devices' peak dense bf16 FLOP/s.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

# Peak dense bf16 FLOP/s per chip, from the vendors' datasheets.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p chips report "TPU v5"; matched after the "lite" kinds above
    "TPU v6 lite": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """Datasheet peak for a device kind, or None when unknown (CPU)."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, devices=None, peak: float | None = None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    devices = devices if devices is not None else jax.devices()
    peak = peak if peak is not None else peak_flops(devices[0])
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * len(devices))


class MetricsLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``workdir``; shows a progress bar.

    Only process 0 writes. Records from earlier runs in the same workdir are kept, so a
    resumed run continues the same curves.
    """

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, progress: bool = True):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0
        self._bar = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = np.asarray(value).item() if not isinstance(value, (str, type(None))) else value
            record[key] = value
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, int(step))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()
        plot_losses(self.workdir)
        plot_layer_metrics(self.workdir)


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in ``read_jsonl`` records, by step (the last record of a step wins)."""
    return sorted({r["step"]: r[key] for r in records if key in r}.items())


def read_jsonl(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(workdir: str, filename: str = "loss.png") -> str | None:
    """Train and eval loss against step, from ``metrics.jsonl``, saved as a PNG in ``workdir``."""
    records = read_jsonl(workdir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = curve(records, key)
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_metrics(workdir: str) -> list[str]:
    """Per-layer curves against step: for each prefix P of the ``P/<metric>/layer<i>`` records of
    ``metrics.jsonl`` (e.g. the model's "moe/..." metrics), ``P.png`` in ``workdir`` with one panel per
    metric and one line per layer. Returns the paths written (none without such records)."""
    records = read_jsonl(workdir)
    keys = sorted({k for r in records for k in r if k.count("/") == 2 and k.rsplit("/", 1)[1].startswith("layer")})
    if not keys:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for prefix in sorted({k.split("/")[0] for k in keys}):
        panels = sorted({k.split("/")[1] for k in keys if k.split("/")[0] == prefix})
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
        for ax, metric in zip(axes[0], panels):
            for key in (k for k in keys if k.startswith(f"{prefix}/{metric}/")):
                ax.plot(*zip(*curve(records, key)), label=key.rsplit("/", 1)[1])
            ax.set_title(f"{prefix}/{metric}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="small")
        fig.tight_layout()
        paths.append(os.path.join(workdir, f"{prefix}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
