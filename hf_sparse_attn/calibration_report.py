"""What a calibration chose and measured, per layer and head: a printed table, a PNG heat map and a model-card section.

A :class:`CalibrationReport` is produced by :func:`hf_sparse_attn.calibrate` (on the calibration sentences) and by
:func:`hf_sparse_attn.calibrate.measure_calibration` (on any sentences, e.g. held-out ones). For each layer ``l`` and
head ``h`` it holds

- the rate ``r`` (``None``: the layer keeps softmax);
- the zero fraction: exact zeros among the valid keys of each query row (padding and, in causal models, future
  keys excluded), averaged over the non-padded query rows -- the quantity :func:`hf_sparse_attn.measure_sparsity`
  reports per layer;
- the attention error: ``sum ||o_r - o||^2 / sum ||O||^2``, the squared change of the head's attention output ``o``
  when softmax is replaced by r-softmax at rate ``r`` on the *same* queries, keys and values (those of the softmax
  model), relative to the energy of the whole layer's attention output ``O`` (all heads, before the output
  projection). Summed over a layer's heads it is the relative squared error of the layer's attention output.

and, for the whole model, the output change (see :data:`hf_sparse_attn.calibrate.MEASURES`) with its standard error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: markers around the calibration section of a model card (outside ``hub``'s own section, so re-rendering the card
#: with ``hf-sparse-attn push`` keeps it)
CARD_START, CARD_END = "<!-- hf_sparse_attn:calibration:start -->", "<!-- hf_sparse_attn:calibration:end -->"

_MEASURE_TEXT = {
    "kl": "mean KL divergence KL(p_softmax || p_patched) of the output distribution per token (nats)",
    "hidden": "mean relative squared error ||h_patched - h||^2 / ||h||^2 of the final hidden state per token",
}


@dataclass
class CalibrationReport:
    """Per layer x head: the rate, the zero fraction and the attention error; for the model: the output change.

    Args:
        model_type: ``config.model_type`` of the calibrated model.
        causal: whether its self-attention is causal (rows have fewer valid keys).
        measure: ``"kl"`` or ``"hidden"``, the output change's definition (:data:`hf_sparse_attn.calibrate.MEASURES`).
        rates: the rates in the form ``patch_model(sparsity=...)`` accepts (one entry per layer).
        head_rates: ``[layer][head]`` rate, ``None`` where the layer keeps softmax.
        zero_fraction: ``[layer][head]`` mean fraction of exact zeros among valid keys.
        attention_error: ``[layer][head]`` attention error (module docstring).
        output_change: mean over sentences of the per-sentence output change.
        output_change_se: its standard error (sample standard deviation / sqrt(sentences)).
        num_sentences: sentences (batch rows) the numbers are measured on.
        granularity: ``"layer"`` or ``"head"`` for a calibration, None for a measurement of given rates.
        budget: the output-change budget the rates were chosen for, or None.
        target_sparsity: the mean zero fraction the rates were chosen for, or None.
        forward_passes: forward passes over the sentences the calibration needed (0 for a measurement).
    """

    model_type: str
    causal: bool
    measure: str
    rates: list[Any]
    head_rates: list[list[float | None]]
    zero_fraction: list[list[float]]
    attention_error: list[list[float]]
    output_change: float
    output_change_se: float
    num_sentences: int
    granularity: str | None = None
    budget: float | None = None
    target_sparsity: float | None = None
    forward_passes: int = 0

    @property
    def mean_sparsity(self) -> float:
        """Zero fraction averaged over all layers and heads (softmax heads count as 0)."""
        values = [v for row in self.zero_fraction for v in row]
        return sum(values) / len(values)

    @property
    def layer_sparsity(self) -> list[float]:
        """Zero fraction of each layer, averaged over its heads (what ``measure_sparsity`` reports)."""
        return [sum(row) / len(row) for row in self.zero_fraction]

    def summary(self) -> str:
        """One line: what was chosen for what, and what it gives."""
        if self.budget is not None:
            goal = f"budget {self.budget:g}"
        elif self.target_sparsity is not None:
            goal = f"target sparsity {self.target_sparsity:g}"
        else:
            goal = "given rates"
        how = f", {self.granularity} granularity, {self.forward_passes} forward passes" if self.granularity else ""
        return (
            f"{self.model_type} ({goal}{how}): mean sparsity {self.mean_sparsity:.3f}, output change "
            f"{self.output_change:.4g} ± {self.output_change_se:.2g} ({self.measure}, {self.num_sentences} sentences)"
        )

    def table(self) -> str:
        """The three ``layer x head`` matrices (rate, zero fraction, attention error) as fixed-width text."""
        blocks = [self.summary(), f"output change: {_MEASURE_TEXT[self.measure]}"]
        for title, matrix, fmt in (
            ("rate r ('-' = softmax)", self.head_rates, "{:.2f}"),
            ("zero fraction among valid keys", self.zero_fraction, "{:.2f}"),
            ("attention error (share of the layer's attention-output energy)", self.attention_error, "{:.1e}"),
        ):
            blocks.append(_matrix_text(title, matrix, fmt))
        return "\n\n".join(blocks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean_sparsity"] = self.mean_sparsity
        return data

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (all fields plus ``mean_sparsity``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationReport:
        data = json.loads(Path(path).read_text())
        data.pop("mean_sparsity", None)
        return cls(**data)

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Draw the rate, zero-fraction and attention-error matrices (layers x heads), one above the other, into a PNG.

        Needs matplotlib (``pip install matplotlib``, or the ``demo`` extra); ``ImportError`` says so otherwise.
        Softmax layers are drawn grey in the rate panel.
        """
        try:
            from matplotlib import colormaps
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.colors import LogNorm
            from matplotlib.figure import Figure
        except ImportError as err:
            raise ImportError(
                "CalibrationReport.heatmap needs matplotlib: pip install matplotlib (or hf-sparse-attn[demo])"
            ) from err
        import numpy as np

        rates = np.array([[math.nan if r is None else r for r in row] for row in self.head_rates], dtype=float)
        errors = np.array(self.attention_error, dtype=float)
        positive = errors[errors > 0]
        panels = (
            ("rate r (grey: softmax)", rates, {"vmin": 0.0, "vmax": 1.0}, "{:.2f}"),
            ("zero fraction", np.array(self.zero_fraction, dtype=float), {"vmin": 0.0, "vmax": 1.0}, "{:.2f}"),
            (
                "attention error",
                np.where(errors > 0, errors, math.nan),
                {"norm": LogNorm(positive.min(), positive.max())} if positive.size else {},
                "{:.0e}",
            ),
        )
        layers, heads = rates.shape
        figure = Figure(figsize=(0.45 * heads + 2.2, 3 * (0.32 * layers + 0.9) + 0.4), layout="constrained")
        FigureCanvasAgg(figure)
        cmap = colormaps["viridis"].with_extremes(bad="#d0d0d0")
        for ax, (name, values, scale, fmt) in zip(figure.subplots(3, 1), panels, strict=True):
            image = ax.imshow(values, cmap=cmap, aspect="auto", **scale)
            figure.colorbar(image, ax=ax, shrink=0.9)
            if heads <= 16 and layers <= 24:
                for (i, j), value in np.ndenumerate(values):
                    if not math.isnan(value):
                        color = "black" if image.norm(value) > 0.6 else "white"
                        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=6, color=color)
            ax.set_title(name, fontsize="medium")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(heads))
            ax.set_yticks(range(layers))
            ax.tick_params(labelsize="x-small")
        figure.suptitle(title or self.summary(), fontsize="x-small", wrap=True)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=130)
        return path

    def card_section(self, image: str | None = None) -> str:
        """Markdown for a model card: how the rates were chosen, the heat map ``image`` (a path relative to the card)
        if given, and the rate of every layer and head as a table."""
        heads = len(self.head_rates[0])
        lines = [
            CARD_START,
            "## Calibrated sparsity",
            "",
            "The r-softmax rates of this model were chosen from data with `hf_sparse_attn.calibrate` "
            f"({self.summary()}). Output change: {_MEASURE_TEXT[self.measure]}.",
            "",
        ]
        if image:
            lines += [f"![rate, zero fraction and attention error per layer and head]({image})", ""]
        lines += [
            "| layer | " + " | ".join(f"h{h}" for h in range(heads)) + " | zero fraction |",
            "|:-----:|" + "-----:|" * heads + "-----:|",
        ]
        for index, (row, sparsity) in enumerate(zip(self.head_rates, self.layer_sparsity, strict=True)):
            cells = " | ".join("softmax" if r is None else f"{r:.2f}" for r in row)
            lines.append(f"| {index} | {cells} | {sparsity:.3f} |")
        lines += ["", CARD_END]
        return "\n".join(lines)


def add_to_card(card_path: str | os.PathLike, report: CalibrationReport, image: str | None = None) -> Path:
    """Put ``report.card_section(image)`` into the model card at ``card_path``: in place of an earlier calibration
    section, else after ``hf_sparse_attn``'s own section (see :mod:`hf_sparse_attn.publishing.hub`), else at the end."""
    from hf_sparse_attn.publishing.hub import SECTION_END

    path = Path(card_path)
    text = path.read_text() if path.is_file() else ""
    section = report.card_section(image)
    if CARD_START in text and CARD_END in text:
        head, rest = text.split(CARD_START, 1)
        text = head + section + rest.split(CARD_END, 1)[1]
    elif SECTION_END in text:
        head, rest = text.split(SECTION_END, 1)
        text = f"{head}{SECTION_END}\n\n{section}{rest}"
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    path.write_text(text)
    return path


def _matrix_text(title: str, matrix: list[list[Any]], fmt: str) -> str:
    cells = [["-" if v is None else fmt.format(v) for v in row] for row in matrix]
    width = max(len(c) for row in cells for c in row) + 1
    header = "layer " + "".join(f"h{h}".rjust(width) for h in range(len(matrix[0])))
    rows = [f"{i:>5} " + "".join(c.rjust(width) for c in row) for i, row in enumerate(cells)]
    return "\n".join([title, header, *rows])
