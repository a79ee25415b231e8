"""Training curves from a Trainer output dir -- loss, evaluation metrics, per-layer sparsity (``hf-sparse-attn plot``).

Reads ``trainer_state.json`` (its ``log_history``) from the output dir, or from its latest ``checkpoint-*`` folder
when the run has not finished, and draws up to three panels into a PNG: training and evaluation loss; the other
evaluation metrics (accuracy, F1, ...); and the measured fraction of zero attention weights of every layer
(``sparsity/layer_<i>``, logged by :class:`~hf_sparse_attn.training.SparsityLoggingCallback`).

Examples::

    $ hf-sparse-attn plot out                     # writes out/training.png
    $ hf-sparse-attn plot out --out docs/images/training.png --title "MiniLM on SST-2, r = 0.5"
    $ hf-sparse-attn plot out --out figures/      # writes figures/training.png

Drawing needs matplotlib, which is not a core dependency: ``pip install "hf-sparse-attn[plot]"``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

STATE_FILE = "trainer_state.json"
#: file name of the figure when the output is a directory
DEFAULT_NAME = "training.png"
MISSING_MATPLOTLIB = 'drawing needs matplotlib, which is not installed: pip install "hf-sparse-attn[plot]"'
#: per-step quantities that are timing or bookkeeping, not training curves
_NOT_METRICS = re.compile(r"(_runtime|_per_second|_preparation_time|_flos)$|^eval_loss$|^epoch$|^step$")
_SPARSITY_LAYER = re.compile(r"^sparsity/layer_(\d+)$")
#: sparsity curves closer than this everywhere are drawn as one (invisible apart at the plot's resolution)
_SAME_CURVE = 2e-3


def find_trainer_state(path: str | os.PathLike) -> Path:
    """``trainer_state.json`` of a Trainer output dir (``path`` itself if it is that file), else the one of the
    checkpoint with the highest step; ``ValueError`` if there is none."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_file():
        return path
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    checkpoints = [p for p in path.glob(f"checkpoint-*/{STATE_FILE}") if p.parent.name.split("-")[-1].isdigit()]
    if not checkpoints:
        raise ValueError(f"{path}: no {STATE_FILE} in it or in a checkpoint-* folder; is it a Trainer output dir?")
    return max(checkpoints, key=lambda p: int(p.parent.name.split("-")[-1]))


def read_log_history(path: str | os.PathLike) -> tuple[list[dict], Path]:
    """``log_history`` of the ``trainer_state.json`` that :func:`find_trainer_state` finds for ``path``, and that
    file; ``ValueError`` naming the file when it is not JSON or has no list ``log_history``."""
    state = find_trainer_state(path)
    try:
        log_history = json.loads(state.read_text(encoding="utf-8")).get("log_history")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{state}: not a Trainer state file (JSON object with a log_history list): {err}") from None
    if not isinstance(log_history, list):
        raise ValueError(f"{state}: no `log_history` list in it; is it a Trainer's {STATE_FILE}?")
    return log_history, state


def output_path(out: str | os.PathLike | None, run_dir: Path) -> Path:
    """The PNG to write: ``out``, or ``out/training.png`` when ``out`` is a directory (an existing one, or a path
    ending in a separator), or ``run_dir/training.png`` when ``out`` is None."""
    if out is None:
        return run_dir / DEFAULT_NAME
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        return Path(out) / DEFAULT_NAME
    return Path(out)


def series(log_history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """The ``(steps, values)`` of ``key`` over the log entries that carry it; for a step logged twice (the Trainer's
    last periodic evaluation and the recipe's final one) the later value."""
    by_step = {entry["step"]: float(entry[key]) for entry in log_history if key in entry and "step" in entry}
    return list(by_step), list(by_step.values())


def plot_log_history(log_history: Sequence[dict], out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw loss, evaluation metrics and per-layer sparsity (whichever are logged) side by side into the PNG ``out``.

    Examples::

        >>> history = json.load(open("out/trainer_state.json"))["log_history"]
        >>> plot_log_history(history, "training.png")
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ModuleNotFoundError:
        raise ModuleNotFoundError(MISSING_MATPLOTLIB) from None

    keys = {key for entry in log_history for key in entry}
    loss_keys = [k for k in ("loss", "eval_loss") if k in keys]
    metric_keys = sorted(k for k in keys if k.startswith("eval_") and not _NOT_METRICS.search(k))
    layer_keys = sorted((k for k in keys if _SPARSITY_LAYER.match(k)), key=lambda k: int(_SPARSITY_LAYER.match(k)[1]))
    panels = [p for p in (("loss", loss_keys), ("evaluation", metric_keys), ("sparsity", layer_keys)) if p[1]]
    if not panels:
        raise ValueError("log_history holds no loss, evaluation metric or sparsity values to plot")

    figure = Figure(figsize=(4.6 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, panel_keys) in zip(axes, panels, strict=True):
        if name == "sparsity":
            _draw_sparsity(ax, log_history, panel_keys)
        else:
            for key in panel_keys:
                _line(ax, *series(log_history, key), label=_label(key))
            ax.set_title("loss" if name == "loss" else "evaluation metrics")
            ax.legend(fontsize="small")
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    return out


def _draw_sparsity(ax, log_history: Sequence[dict], layer_keys: list[str]) -> None:
    """One curve per layer; layers whose curves agree to within ``_SAME_CURVE`` (the same rate in every layer;
    a tie in the scores can add a zero) share one labelled curve."""
    from matplotlib import colormaps

    groups: list[tuple[list[int], list[float], list[int]]] = []  # (steps, values, layers)
    for key in layer_keys:
        steps, values = series(log_history, key)
        layer = int(_SPARSITY_LAYER.match(key)[1])
        same = (
            g
            for g in groups
            if g[0] == steps and max(abs(a - b) for a, b in zip(g[1], values, strict=True)) <= _SAME_CURVE
        )
        group = next(same, None)
        if group is None:
            groups.append((steps, values, [layer]))
        else:
            group[2].append(layer)
    cmap = colormaps["viridis"]
    for index, (steps, values, layers) in enumerate(groups):
        color = cmap(index / max(1, len(groups) - 1) * 0.9)
        _line(ax, steps, values, color=color, label=_layers_label(layers))
    ax.set_title("zero attention weights (fraction of valid keys)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="x-small", ncol=2 if len(groups) > 6 else 1)


def _layers_label(layers: list[int]) -> str:
    """``[3]`` -> "layer 3"; ``[0, 1, 2, 5]`` -> "layers 0-2, 5"."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)
    return f"layer {text}" if len(layers) == 1 else f"layers {text}"


def _line(ax, steps: list[int], values: list[float], **style) -> None:
    """A curve; markers show the individual logs of short runs."""
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, **style)


def _label(key: str) -> str:
    return {"loss": "train loss", "eval_loss": "eval loss"}.get(key, key.removeprefix("eval_"))
