"""Training metrics: a JSONL log, TensorBoard event files, a progress bar, loss and per-layer plots, and MFU.

Throughput and MFU have one definition here: MFU = model FLOPs per token (the model
family's ``flops_per_token``: 6 x matmul parameters + causal attention) x tokens/s
divided by the devices' peak dense bf16 FLOP/s.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging

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
    resumed run continues the same curves. Each record is one ``write`` of one line to a file opened
    for appending, so a crash leaves at most a torn last line; ``repair_jsonl`` cuts it off at the
    next start.
    """

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, progress: bool = True):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0
        self._bar = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        repair_jsonl(path)
        self._jsonl = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
        line = (json.dumps(record) + "\n").encode()
        written = os.write(self._jsonl, line)  # one write per record: appended whole or torn at the end
        if written < len(line):
            raise OSError(f"metrics.jsonl in {self.workdir}: wrote {written} of {len(line)} bytes of a record "
                          f"(disk full?)")
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        os.close(self._jsonl)
        plot_losses(self.workdir)
        plot_layer_metrics(self.workdir)


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in ``read_jsonl`` records, by step (the last record of a step wins)."""
    return sorted({r["step"]: r[key] for r in records if key in r}.items())


def repair_jsonl(path: str) -> int:
    """Cut a torn last line (no newline, or not JSON: a crash or a full disk during a write) off ``path``;
    returns the number of bytes removed (0 when the file is whole or absent)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:  # a last line that is complete but not JSON (e.g. zeros from a crash) is dropped too
        start = data.rfind(b"\n", 0, max(len(data) - 1, 0)) + 1
        try:
            if data[start:].strip():
                json.loads(data[start:])
        except ValueError:
            keep = start
    if keep == len(data):
        return 0
    logging.warning("%s: removed a torn last line (%d bytes: %r) left by an interrupted write.", path,
                    len(data) - keep, data[keep:keep + 60])
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def read_jsonl(workdir: str) -> list[dict]:
    """The records of ``workdir``'s metrics.jsonl; a line that is not JSON is skipped with a warning naming the
    file and the line."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                logging.warning("%s line %d is not a JSON record (a torn write?); skipped it.", path, number)
    return records


def split_finite(points: list[tuple[int, float]]) -> tuple[list[tuple[int, float]], list[int]]:
    """(the finite (step, value) points, the steps whose value is NaN or infinite)."""
    finite = [(s, v) for s, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    return finite, [s for s, v in points if not (isinstance(v, (int, float)) and math.isfinite(v))]


def _plot_curve(ax, points, style: str, label: str) -> None:
    """``points`` as a line; each non-finite point as a red x at the top of the axes, labelled."""
    finite, bad = split_finite(points)
    if finite:
        ax.plot(*zip(*finite), style, label=label, markersize=3)
    if bad:
        ax.plot(bad, [0.97] * len(bad), "x", color="red", transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"{label}: non-finite ({len(bad)})", markersize=6)


def plot_losses(workdir: str, filename: str = "loss.png") -> str | None:
    """Train and eval loss against step, from ``metrics.jsonl``, saved as a PNG in ``workdir``."""
    records = read_jsonl(workdir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_figure(records)
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_figure(records: list[dict]):
    """The figure of ``plot_losses``: train and eval loss against step, non-finite points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = curve(records, key)
        if points:
            _plot_curve(ax, points, style, key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


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
                _plot_curve(ax, curve(records, key), "-", key.rsplit("/", 1)[1])
            ax.set_title(f"{prefix}/{metric}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="small")
        fig.tight_layout()
        paths.append(os.path.join(workdir, f"{prefix}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
