"""``membench-report``: result files → CSV, markdown and LaTeX tables, figures and the verdict.

    membench-report results/paper                 # writes results/paper/report/
    membench-report results/runs results/cuda --out my-report

Corrupt or foreign JSON files are named on stderr and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only, no window; a notebook importing membench.report keeps its own backend

from membench.files import write_atomic
from membench.report import analytic, figures, quantized, scale, tables, validate, verdict, where
from membench.report.load import load_results
from membench.report.render import latex, markdown

RIGHT = tuple(f"{label} ({u})" for label in ("full", "LoRA", "LoRA-FA", "LoRA+recompute", "LoRA-FA+recompute",
                                              "full+recompute", "peak") for u in ("GiB", "MiB")) + (
    "r", "LoRA/LoRA-FA", "activations LoRA/LoRA-FA", "full/LoRA-FA", "recompute time", "weights", "gradients",
    "optimizer", "activations", "saved for backward", "step (ms)", "LoRA/LoRA-FA peak", "LoRA/LoRA-FA activations",
    "activation share (LoRA)")


def default_output(paths: list[Path]) -> Path:
    first = paths[0]
    if first.is_file():
        return first.parent / "report"
    return (first.parent if first.name == "runs" else first) / "report"


def verdict_markdown(frame: pd.DataFrame) -> str:
    parts = [f"# Verdict on LoRA-FA's \"up to {verdict.CLAIM}×\" claim\n", verdict.headline(frame) + "\n"]
    reserved = verdict.reserved_effect(frame)
    if reserved:
        parts.append(reserved + "\n")
    share = verdict.share_effect(frame)
    if share:
        parts += ["## The share of activations decides the ratio\n",
                  "LoRA-FA only shrinks activations, so LoRA/LoRA-FA = (W + A_LoRA) / (W + A_LoRA-FA), where W is "
                  "weights, gradients and optimizer state: it nears the activation ratio only when activations "
                  "dominate.\n", share + "\n"]
    knobs = verdict.knob_effects(frame)
    if not knobs.empty:
        parts += ["## Runs that differ in one knob\n", markdown(knobs)]
    four_bit = quantized.section(frame)
    if four_bit:
        parts += [four_bit]
    table = verdict.verdict_table(frame)
    if not table.empty:
        parts += ["## Every configuration\n", markdown(table, RIGHT)]
    return "\n".join(parts)


def write_validation(frame: pd.DataFrame, out: Path) -> list[Path]:
    """validation.md/.tex when the results hold measured/simulated pairs or reference configurations."""
    pairs = validate.pairs_display(validate.backend_pairs(frame))
    reference = validate.against_reference(frame)
    if pairs.empty and reference.empty:
        return []
    text = ["# Simulation vs measurement\n", validate.summary(frame) + "\n"]
    tex = []
    if not pairs.empty:
        text += ["## Same configuration, measured and simulated\n", markdown(pairs)]
        tex.append(latex(pairs, "Simulated vs measured, per configuration", "tab:validation"))
    if not reference.empty:
        text += ["## Against the H100 reference measurements\n", markdown(reference)]
        tex.append(latex(reference, "Simulated vs the H100 reference peaks", "tab:reference"))
    write_atomic(out / "validation.md", "\n".join(text))
    write_atomic(out / "validation.tex", "\n".join(tex))
    return [out / "validation.md", out / "validation.tex"]


def write_analytic(frame: pd.DataFrame, out: Path) -> list[Path]:
    """analytic.md/.tex: the symbolic walk and Korthikanti's formula against every finished run."""
    return analytic.write_analytic(frame, out)


def write_maxfit(directory: Path | None, out: Path) -> list[Path]:
    """maxfit.md from membench-maxfit's files: the largest batch / sequence each method fits per budget."""
    from membench.maxfit import load_maxfit, markdown_table, sentences

    if directory is None or not directory.is_dir():
        return []
    frame = load_maxfit(directory)
    if frame.empty:
        return []
    text = ["# What fits on a 24, 40 and 80 GiB card\n",
            "Largest batch size (sequence fixed) and largest sequence length (batch fixed) whose simulated "
            "`max_memory_allocated` stays within each budget (membench-maxfit).\n",
            "\n".join(f"- {line}" for line in sentences(frame)) + "\n", markdown_table(frame)]
    write_atomic(out / "maxfit.md", "\n".join(text))
    return [out / "maxfit.md"]


def write_attribution(frame: pd.DataFrame, out: Path) -> list[Path]:
    """attribution.md and figures/attribution.png|pdf: LoRA vs LoRA-FA saved bytes per module."""
    text = where.attribution_markdown(frame)
    if not text:
        return []
    write_atomic(out / "attribution.md", text)
    written = [out / "attribution.md"]
    fig = where.attribution_figure(frame)
    if fig is not None:
        (out / "figures").mkdir(exist_ok=True)
        for suffix in ("png", "pdf"):
            fig.savefig(out / "figures" / f"attribution.{suffix}", dpi=150, bbox_inches="tight",
                        metadata={"CreationDate": None} if suffix == "pdf" else None)
            written.append(out / "figures" / f"attribution.{suffix}")
        figures.plt.close(fig)
    return written


def build_report(paths: list[Path], out: Path, maxfit: Path | None = None) -> tuple[list[Path], list]:
    """Write the whole report for the results under ``paths`` into ``out``; returns (files, skipped)."""
    frame, skipped = load_results(*paths, warn=False)
    if frame.empty:
        raise SystemExit(f"membench-report: no readable results under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    csv = out / "runs.csv"
    write_atomic(csv, frame.to_csv(index=False))
    written.append(csv)

    named = {"headline": (tables.headline_table(frame), "Peak memory per method at each model's largest batch"),
             "comparison": (tables.comparison_table(frame), "Peak memory per method and the ratios between them"),
             "breakdown": (tables.breakdown_table(frame), "Every run: peak and its breakdown (GiB)"),
             "verdict": (verdict.verdict_table(frame), f"LoRA/LoRA-FA ratio against the {verdict.CLAIM}x claim")}
    if scale.has_parallel(frame):
        named["scale"] = (scale.fewest_gpus_table(frame),
                          "Per-GPU peak (GiB) by number of GPUs under FSDP2, and the fewest GPUs that fit each card")
    if quantized.has_quantized(frame):
        named["quantized"] = (quantized.quantized_table(frame),
                              "Peak memory (GiB) with a 4-bit base and with DoRA; LoRA-FA's ratio on each base")
    for name, (table, caption) in named.items():
        if table.empty:
            continue
        for suffix, text in (("md", markdown(table, RIGHT)), ("tex", latex(table, caption, f"tab:{name}", RIGHT))):
            path = out / f"{name}.{suffix}"
            if name == "verdict" and suffix == "md":
                text = verdict_markdown(frame)
            write_atomic(path, text)
            written.append(path)
    written += figures.save_all(frame, out / "figures")
    if scale.has_parallel(frame):
        written += figures.save_figure(scale.peak_vs_world_size(frame), out / "figures", "peak_vs_world_size")
    if quantized.has_quantized(frame):
        written += figures.save_figure(quantized.stacked_by_batch(frame), out / "figures", "quantized_by_batch")
    written += write_validation(frame, out)
    written += write_analytic(frame, out)
    written += write_maxfit(maxfit, out)
    written += write_attribution(frame, out)

    index = ["# membench report\n", f"{len(frame)} runs from {', '.join(map(str, paths))} "
             f"({', '.join(f'{n} {s}' for s, n in frame['status'].value_counts().items())}).\n",
             verdict.headline(frame) + "\n"]
    headline = named["headline"][0]
    if not headline.empty:
        index += ["## Headline\n", markdown(headline, RIGHT)]
    index += ["## Figures\n"] + [f"![{name}](figures/{name}.png)\n" for name in figures.FIGURES]
    if quantized.has_quantized(frame):
        index += ["![quantized_by_batch](figures/quantized_by_batch.png)\n"]
    if scale.has_parallel(frame):
        index += ["![peak_vs_world_size](figures/peak_vs_world_size.png)\n"]
    index += ["## Files\n", "- `runs.csv`: every run, one row each (bytes as integers)",
              "- `comparison.md|tex`, `breakdown.md|tex`, `headline.md|tex`: tables",
              "- `verdict.md|tex`: the claim, configuration by configuration, and what drives the ratio",
              "- `validation.md|tex` (when there is something to compare): simulated vs measured",
              "- `analytic.md|tex`: the symbolic walk (membench/analytic/) and Korthikanti's formula vs measured",
              "- `maxfit.md` (with membench-maxfit results): the largest batch and sequence each method fits",
              "- `attribution.md`, `figures/attribution.png|pdf`: which modules hold LoRA's extra saved bytes",
              "- `scale.md|tex`, `figures/peak_vs_world_size` (with FSDP2 runs): per-GPU peak by GPU count",
              "- `quantized.md|tex` (with QLoRA or DoRA runs): each method's peak, LoRA-FA's ratio on a 4-bit base",
              "- `figures/*.png|pdf`\n"]
    write_atomic(out / "README.md", "\n".join(index))
    written.append(out / "README.md")
    return written, skipped


def write_fit_by_card(paths: list[Path], out: Path) -> Path:
    """fit.md: membench-fit's answers in ``paths`` as one table, the largest batch per model, method and card."""
    from membench.fit import by_card_markdown
    text = ["# What fits on which GPU\n",
            "The largest batch each method fits on each card at the sequence length shown (membench-fit; "
            "'—': not even batch 1 fits).\n"] + [by_card_markdown(path) for path in paths]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "fit.md", "\n".join(text))
    print(f"membench-report: {out / 'fit.md'}")
    return out / "fit.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="membench-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["results/runs"], type=Path,
                        help="result files or folders (default: results/runs)")
    parser.add_argument("--out", type=Path, help="output folder (default: <first folder>/report)")
    parser.add_argument("--maxfit", type=Path, help="membench-maxfit output to include "
                        "(default: <first folder>/maxfit when it exists)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    out = args.out or default_output(args.paths)
    from membench.fit import load_fit_documents  # imported here: it brings the simulator (seconds)

    if all(path.is_dir() and load_fit_documents(path) for path in args.paths):  # membench-fit's folders
        write_fit_by_card(args.paths, out)
        return
    maxfit = args.maxfit or default_output(args.paths).parent / "maxfit"
    written, skipped = build_report(args.paths, out, maxfit)
    for item in skipped:
        print(f"membench-report: skipped {item.reason}", file=sys.stderr)
    print(f"membench-report: {len(written)} files in {out}; start with {out / 'README.md'}")


if __name__ == "__main__":
    main()
