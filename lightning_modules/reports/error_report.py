"""Mask mining's error-type control report (the paper's Fig. 4): FP / FN / TP counts and per-volume Dice, before and after.

Written to the run folder for each evaluated stage (``error_types.*`` for validation,
``test_error_types.*`` for test) and logged to W&B when it is a logger:

* ``<prefix>error_types.md`` and ``.csv``: voxel counts of the final masks (original resolution,
  after the largest-component step), summed over the stage's volumes, before and after mining, with
  the change in percent; then each volume's Dice before and after.
* ``<prefix>error_types.png``: the counts as grouped bars, each group normalised to its larger bar
  as in the paper's figure, with the raw counts printed on the bars.

A cascade has one such report per part (``<stage>_liver_error_types.*``, ``<stage>_lesion_error_types.*``) and
one for both (``write_parts_report``: ``<stage>_error_types.md`` and ``.png``, liver and lesion rows side by side).
"""

from __future__ import annotations

import csv
from pathlib import Path

from datamodules.io.atomic import replace_together
from lightning_modules.reports.figures import plt, save_figure

ERROR_TYPES = ("fp", "fn", "tp")
TITLES = {"fp": "false positives", "fn": "false negatives", "tp": "true positives"}


def total_counts(per_volume: dict[int, dict[str, float]]) -> dict[str, int]:
    """Voxel counts summed over volumes: ``{"fp": .., "fn": .., "tp": ..}``."""
    return {t: int(sum(figures[f"{t}_voxels"] for figures in per_volume.values())) for t in ERROR_TYPES}


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "n/a"


def error_table(before: dict[str, int], after: dict[str, int], dice: list[tuple[str, float, float]]) -> str:
    lines = ["| error type | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {TITLES[t]} | {before[t]} | {after[t]} | {_change(before[t], after[t])} |" for t in ERROR_TYPES]
    lines += ["", "| volume | Dice before | Dice after | change |", "|---|---|---|---|"]
    lines += [f"| {volume} | {b:.4f} | {a:.4f} | {a - b:+.4f} |" for volume, b, a in dice]
    mean_b, mean_a = (sum(x[i] for x in dice) / max(1, len(dice)) for i in (1, 2))
    lines.append(f"| mean | {mean_b:.4f} | {mean_a:.4f} | {mean_a - mean_b:+.4f} |")
    return "\n".join(lines) + "\n"


def error_figure(before: dict[str, int], after: dict[str, int], title: str) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    _error_bars(axis, before, after, title)
    figure.tight_layout()
    return figure


def _error_bars(axis, before: dict[str, int], after: dict[str, int], title: str) -> None:
    width = 0.38
    for offset, (label, counts, colour) in enumerate((("before mining", before, "#9e9e9e"), ("after mining", after, "#1f77b4"))):
        for i, t in enumerate(ERROR_TYPES):
            top = max(before[t], after[t]) or 1
            bar = axis.bar(i + (offset - 0.5) * width, counts[t] / top, width, color=colour, label=label if i == 0 else None)
            axis.bar_label(bar, labels=[f"{counts[t]:,}"], fontsize=7)
    axis.set_xticks(range(len(ERROR_TYPES)), [TITLES[t] for t in ERROR_TYPES])
    axis.set_ylabel("voxels (relative to the larger bar)")
    axis.set_ylim(0, 1.15)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8, loc="lower right")


def write_error_report(
    folder: Path,
    stage: str,
    per_volume_before: dict[int, dict[str, float]],
    per_volume_after: dict[int, dict[str, float]],
    volume_ids: list[str],
    loggers=(),
    step: int | None = None,
) -> dict[str, int]:
    """Write the report files; returns the counts ``{"before/fp": .., "fp": .., ...}``."""
    before, after = total_counts(per_volume_before), total_counts(per_volume_after)
    dice = [(volume_ids[v], per_volume_before[v]["dice_volume"], per_volume_after[v]["dice_volume"]) for v in sorted(per_volume_after)]
    prefix = "" if stage == "val" else f"{stage}_"
    header = ["volume", "fp_before", "fp_after", "fn_before", "fn_after", "tp_before", "tp_after", "dice_before", "dice_after"]

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for v in sorted(per_volume_after):
                b, a = per_volume_before[v], per_volume_after[v]
                writer.writerow([volume_ids[v], *(int(x[f"{t}_voxels"]) for t in ERROR_TYPES for x in (b, a)),
                                 f"{b['dice_volume']:.6g}", f"{a['dice_volume']:.6g}"])
            writer.writerow(["total", *(x[t] for t in ERROR_TYPES for x in (before, after)), "", ""])

    table = error_table(before, after, dice)
    # the study's Fig. 4 reads the csv's total row: the two files are replaced together, never half-written
    replace_together([(folder / f"{prefix}error_types.md", lambda tmp: tmp.write_text(table)),
                      (folder / f"{prefix}error_types.csv", write_csv)])
    stage_name = {"val": "validation", "test": "test"}.get(stage, stage)
    figure = error_figure(before, after, f"error types on the {stage_name} set ({len(per_volume_after)} volumes)")
    save_figure(figure, folder / f"{prefix}error_types.png", loggers, f"{stage}/error_types", step)
    for logger in loggers:
        if hasattr(logger, "log_table"):
            rows = [[volume, b, a] for volume, b, a in dice]
            logger.log_table(key=f"{stage}/dice_before_after", columns=["volume", "dice_before", "dice_after"], data=rows, step=step)
    return {**{f"before/{t}_voxels": before[t] for t in ERROR_TYPES}, **{f"{t}_voxels": after[t] for t in ERROR_TYPES}}


def parts_table(counts: dict[str, tuple[dict[str, int], dict[str, int]]]) -> str:
    """One markdown table of every part's (``liver``, ``lesion``) FP / FN / TP voxels before and after mining."""
    lines = ["| part | error type | before | after | change |", "|---|---|---|---|---|"]
    for part, (before, after) in counts.items():
        lines += [f"| {part} | {TITLES[t]} | {before[t]} | {after[t]} | {_change(before[t], after[t])} |" for t in ERROR_TYPES]
    return "\n".join(lines) + "\n"


def write_parts_report(
    folder: Path,
    stage: str,
    per_volume: dict[str, tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]],
    loggers=(),
    step: int | None = None,
) -> dict[str, dict[str, int]]:
    """A cascade's error types for all its parts in one report (the paper's Fig. 4, liver and lesion):
    ``<stage>_error_types.md`` (a row per part and error type) and ``.png`` (a panel per part). ``per_volume``: per
    part, its per-volume counts before and after mining (``part_error_counts``). Returns the summed counts per part."""
    counts = {part: (total_counts(before), total_counts(after)) for part, (before, after) in per_volume.items()}
    (folder / f"{stage}_error_types.md").write_text(parts_table(counts))
    figure, axes = plt.subplots(1, len(counts), figsize=(5.5 * len(counts), 3.4), squeeze=False)
    stage_name = {"val": "validation", "test": "test"}.get(stage, stage)
    for axis, (part, (before, after)) in zip(axes[0], counts.items()):
        _error_bars(axis, before, after, f"{part} error types on the {stage_name} set ({len(per_volume[part][1])} volumes)")
    figure.tight_layout()
    save_figure(figure, folder / f"{stage}_error_types.png", loggers, f"{stage}/error_types", step)
    return {part: {**{f"before/{t}_voxels": b[t] for t in ERROR_TYPES}, **{f"{t}_voxels": a[t] for t in ERROR_TYPES}}
            for part, (b, a) in counts.items()}
