"""Render the reproduction tables and plots from the run JSON files only, into ``docs/results.md`` and ``docs/images/``.

Each table replaces the text between its two markers in the document (``<!-- reproduce:glue -->`` …
``<!-- /reproduce:glue -->``, likewise ``lm_heads``, ``finetune`` and ``calibration``), so the prose around them
stays; rerunning with
no new results changes nothing. Settings without any finished run are left out; the ``seeds`` column says how many
runs each cell averages. Mean ± sample standard deviation over seeds (a single seed: the value alone).

The model card of each patched setting's reference checkpoint (its first seed, kept by the drivers) is rendered
with :func:`hf_sparse_attn.publishing.hub.create_model_card` into ``model_cards/<name>/README.md``, when the checkpoint
is on this machine.

    python -m benchmarks.reproduce.summarise
    python -m benchmarks.reproduce.summarise --results-dir benchmarks/results/reproduce --doc docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.reproduce import calibration, glue, lm_heads
from benchmarks.reproduce.runner import REPO, RESULTS_DIR, trained_on

GLUE_PLOT = "reproduce_glue_metric_vs_r.png"
#: Hub ids of the data the cards' results were measured on (the runs read the same files locally)
GLUE_DATASET = "nyu-mll/glue"
LM_DATASETS = {"ptb": "ptb-text-only/ptb_text_only", "wt2": "Salesforce/wikitext"}
#: card folder name = prefix + setting, e.g. ``minilm-rte-r0.5``, ``gpt2-ptb-mos``
CARD_PREFIX = {glue.TABLE: "minilm-", lm_heads.TABLE: "gpt2-", calibration.TABLE: "minilm-"}
LM_PLOT = "reproduce_lm_curves.png"
#: the heat map of each task's calibrated map (``{task}`` filled in), in the images folder and in its model card
CALIBRATION_PLOT = "reproduce_calibration_{task}.png"
Record = dict[str, Any]


def load(results_dir: Path, table: str) -> dict[str, list[Record]]:
    """The finished runs of ``table``, by setting (seeds in order)."""
    groups: dict[str, list[Record]] = {}
    for path in sorted((results_dir / table).glob("*.json")):
        if path.name.startswith(calibration.MAP_PREFIX):
            continue  # a calibration map, not a run
        record = json.loads(path.read_text())
        groups.setdefault(record["setting"], []).append(record)
    for runs in groups.values():
        runs.sort(key=lambda run: run["seed"])
    return groups


def mean_sd(values: Sequence[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run_seconds(runs: Iterable[Record]) -> float | None:
    """Mean time of the whole runs (start-up and evaluation included), resumed runs left out (their times cover only
    the part after the restart). On the CPU it is CPU time (user + system of the recipe processes), which, unlike wall
    time, does not count waiting for a CPU shared with other jobs; on a GPU it is wall time (the process's CPU time
    there is the host's), counted only for runs that had the GPU to themselves (``machine.jobs`` 1): with several
    runs sharing it, wall time measures who ran alongside. Pass runs of one device (:func:`time_ratio` does)."""

    def timed_alone(run: Record) -> bool:
        return trained_on(run) == "cpu" or run.get("machine", {}).get("jobs", 1) == 1

    timed = [
        run["cpu_seconds" if trained_on(run) == "cpu" else "wall_seconds"]
        for run in runs
        if not run["resumed"] and timed_alone(run)
    ]
    return statistics.mean(timed) if timed else None


def final_sparsity(run: Record) -> float | None:
    """The last ``sparsity/mean`` the run logged (None for softmax, which logs none)."""
    values = [entry["sparsity/mean"] for entry in run["log_history"] if "sparsity/mean" in entry]
    return values[-1] if values else None


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float | None, reference: float | None) -> str:
    return "—" if value is None or reference is None else f"{value / reference:.2f}×"


def time_ratio(runs: Sequence[Record], reference: Sequence[Record] | None) -> str:
    """``run_seconds(runs) / run_seconds(reference)`` over runs of one device, as CPU and GPU times do not compare:
    all on the CPU, the plain ratio; otherwise one labelled ratio per device both groups have
    (``1.10× cpu, 0.95× cuda``), or ``—`` naming the devices when they have none in common."""
    if not reference:
        return "—"
    mine, theirs = {trained_on(r) for r in runs}, {trained_on(r) for r in reference}
    if mine | theirs == {"cpu"}:
        return ratio(run_seconds(runs), run_seconds(reference))
    if not mine & theirs:
        return f"— ({'+'.join(sorted(mine))} vs {'+'.join(sorted(theirs))})"

    def on(group: Sequence[Record], name: str) -> float | None:
        return run_seconds([r for r in group if trained_on(r) == name])

    return ", ".join(f"{ratio(on(runs, d), on(reference, d))} {d}" for d in sorted(mine & theirs))


def glue_table(groups: dict[str, list[Record]]) -> str:
    rows = []
    for task in glue.TASKS:
        softmax = groups.get(f"{task}/softmax")
        for name, _, _ in glue.SETTINGS:
            runs = groups.get(f"{task}/{name}")
            if not runs:
                continue
            metric = glue.METRIC[task]
            sparsity = [s for s in map(final_sparsity, runs) if s is not None]
            rows.append(
                [
                    task,
                    name,
                    metric.removeprefix("eval_"),
                    mean_sd([r["metrics"]["eval"][metric] for r in runs], 4),
                    f"{statistics.mean(sparsity):.3f}" if sparsity else "— (not logged)",
                    time_ratio(runs, softmax),
                    str(len(runs)),
                ]
            )
    header = [
        "task",
        "attention",
        "metric (dev)",
        "mean ± sd",
        "measured sparsity",
        "CPU time vs softmax",
        "seeds",
    ]
    return table(header, rows) if rows else "_No finished run yet._"


def lm_rows(groups: dict[str, list[Record]], prefix: str) -> list[list[str]]:
    softmax = groups.get(f"{prefix}/softmax")
    base_params = softmax[0]["parameters"] if softmax else None
    rows = []
    for head in lm_heads.HEADS:
        runs = groups.get(f"{prefix}/{head}")
        if not runs:
            continue
        added = "—" if base_params is None else f"{runs[0]['parameters'] - base_params:+,}"
        rows.append(
            [
                prefix,
                head,
                mean_sd([r["metrics"]["eval"]["eval_perplexity"] for r in runs], 2),
                mean_sd([r["metrics"]["test"]["eval_perplexity"] for r in runs], 2),
                added,
                time_ratio(runs, softmax),
                str(len(runs)),
            ]
        )
    return rows


def lm_table(groups: dict[str, list[Record]]) -> str:
    rows = [row for corpus in lm_heads.CORPORA for row in lm_rows(groups, corpus)]
    header = ["corpus", "head", "valid ppl", "test ppl", "parameters vs softmax", "CPU time vs softmax", "seeds"]
    return table(header, rows) if rows else "_No finished run yet._"


def finetune_table(groups: dict[str, list[Record]]) -> str:
    rows = lm_rows(groups, "ptb-finetune")
    header = ["start", "head", "valid ppl", "test ppl", "parameters vs softmax", "CPU time vs softmax", "seeds"]
    return table(header, rows) if rows else "_No finished run yet._"


def calibration_maps(results_dir: Path) -> list[Record]:
    """The calibration maps ``calibration.py`` computed (its ``settings`` and both methods' reports)."""
    return [
        json.loads(p.read_text()) for p in sorted((results_dir / calibration.TABLE).glob(calibration.MAP_PREFIX + "*"))
    ]


def calibration_map_of(runs: Sequence[Record], maps: Sequence[Record]) -> Record | None:
    """The map the calibrated ``runs`` were trained with (matched by its settings), None if it is not on disk."""
    return next((m for m in maps if m["settings"] == runs[0]["config"]["calibration"]), None)


def calibration_table(
    glue_groups: dict[str, list[Record]], groups: dict[str, list[Record]], maps: Sequence[Record]
) -> str:
    """Per task: the uniform rate (table 1's run) and the calibrated per-head map, at the same mean sparsity.

    The calibration columns come from the map file (measured on the calibration examples before fine-tuning); the
    paired difference is calibrated minus uniform over the seeds both have finished; the time is the runs' CPU time
    (:func:`run_seconds`), as the two methods' runs were made in different sessions on a shared machine."""
    rows = []
    for task in glue.TASKS:
        calibrated = groups.get(f"{task}/calibrated")
        if not calibrated:
            continue
        uniform = glue_groups.get(f"{task}/{calibration.UNIFORM}", [])
        found = calibration_map_of(calibrated, maps)
        metric = glue.METRIC[task]
        score = {method: {r["seed"]: r["metrics"]["eval"][metric] for r in runs}
                 for method, runs in (("uniform", uniform), ("calibrated", calibrated))}  # fmt: skip
        paired = sorted(set(score["uniform"]) & set(score["calibrated"]))
        for method, runs in (("uniform", uniform), ("calibrated", calibrated)):
            if not runs:
                continue
            report = found[method] if found else None
            sparsity = [s for s in map(final_sparsity, runs) if s is not None]
            difference = "—"
            if method == "calibrated" and paired:
                difference = mean_sd([score["calibrated"][s] - score["uniform"][s] for s in paired], 4)
                difference = f"{difference} ({len(paired)} paired)"
            rows.append(
                [
                    task,
                    f"r = {calibration.UNIFORM_RATE} everywhere" if method == "uniform" else "calibrated per head",
                    f"{report['mean_sparsity']:.3f}" if report else "—",
                    f"{report['output_change']:.3f} ± {report['output_change_se']:.3f}" if report else "—",
                    f"{statistics.mean(sparsity):.3f}" if sparsity else "—",
                    metric.removeprefix("eval_"),
                    mean_sd(list(score[method].values()), 4),
                    difference,
                    time_ratio(runs, uniform),
                    str(len(runs)),
                ]
            )
    header = [
        "task",
        "rates",
        "mean sparsity (calibration data)",
        "output change (calibration data)",
        "measured sparsity (dev, end)",
        "metric (dev)",
        "mean ± sd",
        "calibrated − uniform",
        "CPU time vs uniform",
        "seeds",
    ]
    return table(header, rows) if rows else "_No finished run yet._"


def plot_calibration(groups: dict[str, list[Record]], maps: Sequence[Record], images_dir: Path) -> list[Path]:
    """The heat map (rate, zero fraction, attention error per layer and head) of each task's calibrated map."""
    from hf_sparse_attn.calibration_report import CalibrationReport

    paths = []
    for task in glue.TASKS:
        runs = groups.get(f"{task}/calibrated")
        found = calibration_map_of(runs, maps) if runs else None
        if found is None:
            continue
        report = CalibrationReport(**{k: v for k, v in found["calibrated"].items() if k != "mean_sparsity"})
        paths.append(
            report.heatmap(images_dir / CALIBRATION_PLOT.format(task=task), title=f"{task}: {report.summary()}")
        )
    return paths


def figure(columns: int, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * columns, 2.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, squeeze=False)[0]


def plot_glue(groups: dict[str, list[Record]], path: Path) -> bool:
    """The GLUE metric against r per task (mean and sd over seeds; softmax as a horizontal band)."""
    tasks = [t for t in glue.TASKS if any(s.startswith(f"{t}/") for s in groups)]
    if not tasks:
        return False
    fig, axes = figure(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        metric = glue.METRIC[task]
        values = {
            name: [r["metrics"]["eval"][metric] for r in groups.get(f"{task}/{name}", [])]
            for name, _, _ in glue.SETTINGS
        }
        points = [(rate, values[name]) for name, rate, _ in glue.SETTINGS if rate is not None and values[name]]
        if points:
            ax.errorbar(
                [rate for rate, _ in points],
                [statistics.mean(v) for _, v in points],
                yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points],
                marker="o",
                capsize=3,
                label="r-softmax",
            )
        if values["softmax"]:
            mean = statistics.mean(values["softmax"])
            sd = statistics.stdev(values["softmax"]) if len(values["softmax"]) > 1 else 0.0
            ax.axhline(mean, color="gray", linestyle="--", label="softmax")
            ax.axhspan(mean - sd, mean + sd, color="gray", alpha=0.2)
        ax.set(title=task, xlabel="r (target sparsity)", ylabel=metric.removeprefix("eval_"), xlim=(0, 1))
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


def plot_lm(groups: dict[str, list[Record]], path: Path) -> bool:
    """Validation perplexity against step, first seed of each head, one panel per corpus / the fine-tuning row."""
    prefixes = [p for p in (*lm_heads.CORPORA, "ptb-finetune") if any(s.startswith(f"{p}/") for s in groups)]
    if not prefixes:
        return False
    fig, axes = figure(len(prefixes))
    for ax, prefix in zip(axes, prefixes, strict=True):
        for head in lm_heads.HEADS:
            runs = groups.get(f"{prefix}/{head}")
            if not runs:
                continue
            curve = [(e["step"], e["eval_perplexity"]) for e in runs[0]["log_history"] if "eval_perplexity" in e]
            ax.plot([s for s, _ in curve], [p for _, p in curve], marker=".", label=head)
        ax.set(title=prefix, xlabel="optimizer step", ylabel="validation perplexity", yscale="log")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


def replace_between(text: str, key: str, body: str, doc: Path) -> str:
    start, end = f"<!-- reproduce:{key} -->", f"<!-- /reproduce:{key} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{doc}: needs exactly one {start} followed by one {end} (where the {key} table goes)")
    before, rest = text.split(start)
    return f"{before}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def image_link(path: Path, doc: Path, alt: str) -> str:
    return f"![{alt}]({Path(os.path.relpath(path, doc.parent)).as_posix()})"


def summarise(results_dir: Path, doc: Path, images_dir: Path) -> str:
    """Render every table (and its plot when there is data) into ``doc``; returns the new text."""
    glue_runs, lm_runs = load(results_dir, glue.TABLE), load(results_dir, lm_heads.TABLE)
    calibrated_runs, maps = load(results_dir, calibration.TABLE), calibration_maps(results_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    plots = {"glue": (plot_glue, glue_runs, GLUE_PLOT), "lm_heads": (plot_lm, lm_runs, LM_PLOT)}
    bodies = {
        "glue": glue_table(glue_runs),
        "lm_heads": lm_table(lm_runs),
        "finetune": finetune_table(lm_runs),
        "calibration": calibration_table(glue_runs, calibrated_runs, maps),
    }
    text = doc.read_text()
    for key, body in bodies.items():
        if key in plots:
            plot, runs, image = plots[key]
            if plot(runs, images_dir / image):
                body += "\n\n" + image_link(images_dir / image, doc, f"{key} results")
        if key == "calibration":
            for path in plot_calibration(calibrated_runs, maps, images_dir):
                body += "\n\n" + image_link(path, doc, f"calibrated map: {path.stem}")
        text = replace_between(text, key, body, doc)
    doc.write_text(text)
    return text


def card_inputs(record: Record) -> dict[str, Any]:
    """What the model card of a run says beyond its checkpoint: base model, dataset and results."""
    if record["table"] in (glue.TABLE, calibration.TABLE):
        return {"base_model": glue.BASE_MODEL, "dataset": GLUE_DATASET, "eval_results": record["metrics"]["eval"]}
    results = {
        f"{split} perplexity": record["metrics"][key]["eval_perplexity"]
        for split, key in (("validation", "eval"), ("test", "test"))
    }
    return {"dataset": LM_DATASETS[record["config"]["corpus"]], "eval_results": results}


def render_cards(results_dir: Path, cards_dir: Path) -> list[Path]:
    """``cards_dir/<setting>/README.md`` for the kept checkpoint (first seed) of every patched setting, rendered with
    :func:`hf_sparse_attn.publishing.hub.create_model_card` from the checkpoint's ``config.json`` and the run's
    JSON. Softmax settings are plain transformers models with no patch to describe, so they get no card. A
    calibrated setting's card also carries its map (the heat map beside the card and the rate table), as the card
    ``hf-sparse-attn calibrate`` writes."""
    from transformers import AutoConfig

    from hf_sparse_attn.calibration_report import CalibrationReport, add_to_card
    from hf_sparse_attn.commands.calibrate import HEATMAP_FILE
    from hf_sparse_attn.config import CONFIG_KEY
    from hf_sparse_attn.publishing.hub import create_model_card

    written = []
    maps = calibration_maps(results_dir)
    for table in (glue.TABLE, lm_heads.TABLE, calibration.TABLE):
        for runs in load(results_dir, table).values():
            first = runs[0]
            if not first["checkpoint"] or not (Path(first["checkpoint"]) / "config.json").is_file():
                continue
            config = AutoConfig.from_pretrained(first["checkpoint"])
            if getattr(config, CONFIG_KEY, None) is None:
                continue
            name = CARD_PREFIX[table] + first["name"].rsplit("-seed", 1)[0]
            card = create_model_card(
                config,
                repo_id=name,
                hyperparameters=first["config"],
                log_history=first["log_history"],
                **card_inputs(first),
            )
            path = cards_dir / name / "README.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            card.save(path)
            found = calibration_map_of(runs, maps) if table == calibration.TABLE else None
            if found is not None:
                report = CalibrationReport(**{k: v for k, v in found["calibrated"].items() if k != "mean_sparsity"})
                add_to_card(path, report, report.heatmap(path.parent / HEATMAP_FILE).name)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="the drivers' JSON files")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md", help="the document to update")
    parser.add_argument("--images-dir", type=Path, default=REPO / "docs" / "images", help="where the PNGs go")
    parser.add_argument(
        "--cards-dir", type=Path, default=REPO / "model_cards", help="where the model cards of the kept checkpoints go"
    )
    args = parser.parse_args(argv)
    summarise(args.results_dir, args.doc, args.images_dir)
    print(f"updated {args.doc}")
    for path in render_cards(args.results_dir, args.cards_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
