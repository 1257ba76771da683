"""membench-report on fixture results: every table and figure, skipped files, ratios checked by hand."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from membench.report import analytic, figures, tables, validate, verdict
from membench.report.cli import build_report, main
from membench.report.compare import side_by_side
from membench.report.load import load_results
from membench.results import write_result
from membench.runner import measure
from tests.conftest import tiny

MODELS = ("tiny-llama", "tiny-roberta")
# One worker builds the session's sweep (12 s) once, not once per worker (pyproject: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("report_sweep")


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory):
    """A small sweep: 2 models x (full, LoRA, LoRA-FA, LoRA+recompute) x batch 2, 4 x rank 4, 8; one OOM, one error."""
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    for model in MODELS:
        for batch in (2, 4):
            shape = (f"workload.batch_size={batch}",)
            for method in ("full", "lora_recompute"):
                extra = () if method == "full" else ("method.rank=8",)
                write_result(measure(tiny(model, method, *shape, *extra, backend="simulate")), runs)
            for method in ("lora", "lora_fa"):
                for rank in (4, 8):
                    write_result(measure(tiny(model, method, *shape, f"method.rank={rank}", backend="simulate")), runs)
    # An OOM and an error row, as a GPU sweep would record them.
    source = json.loads(next(runs.glob("tiny-llama--lora--r8--bs4*.json")).read_text())
    for state, message in (("oom", "CUDA out of memory. Tried to allocate 2.00 GiB"), ("error", "RuntimeError: boom")):
        row = json.loads(json.dumps(source))
        row["run_id"] = row["run_id"].replace("simulate", f"cuda-{state}")
        row["env"]["backend"], row["env"]["device_name"] = "cuda", "NVIDIA H100 80GB HBM3"
        row["status"] = {"state": state, "phase": "backward", "message": message}
        (runs / f"{row['run_id']}.json").write_text(json.dumps(row))
    return runs.parent


def test_loads_every_result_with_integer_bytes(sweep_dir):
    frame, skipped = load_results(sweep_dir)
    assert len(frame) == 2 * (2 * 2 + 2 * 2 * 2) + 2 and not skipped
    assert str(frame["peak_allocated_bytes"].dtype) == "Int64"
    assert set(frame["status"]) == {"ok", "oom", "error"}
    assert frame["git_sha"].notna().all() and frame["torch"].notna().all()  # provenance on every row


def test_ratios_match_the_files(sweep_dir):
    frame, _ = load_results(sweep_dir)
    simulated = frame[frame["backend"] == "simulate"]
    table = side_by_side(simulated)
    assert len(table) == len(MODELS) * 2 * 2  # model x batch x rank
    peak = {(r.model, r.method, r.batch_size, None if r.kind == "full" else r.rank): r.peak_allocated_bytes
            for r in simulated.itertuples()}
    for row in table.itertuples():
        lora, lora_fa = peak[(row.model, "lora", row.batch_size, row.rank)], peak[(row.model, "lora_fa",
                                                                                     row.batch_size, row.rank)]
        assert row.lora_over_lora_fa == pytest.approx(lora / lora_fa)
        assert row.full_over_lora_fa == pytest.approx(peak[(row.model, "full", row.batch_size, None)] / lora_fa)
        assert lora > lora_fa  # LoRA-FA never needs more


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every GitHub markdown table in ``text``: (header cells, body rows of cells)."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif block:
            assert len(block) >= 2 and all(set(cell) <= set("-:") for cell in block[1]), block[:2]
            assert all(len(row) == len(block[0]) for row in block), "ragged table"
            tables.append((block[0], block[2:]))
            block = []
    return tables


def tex_rows(text: str) -> int:
    """Body rows of a booktabs tabular (between \\midrule and \\bottomrule)."""
    body = text.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    return sum(line.rstrip().endswith("\\\\") for line in body.splitlines())


def setting(run) -> str:
    return f"bs{run.batch_size} seq{run.seq_len} {run.precision}"


def rank_cell(rank) -> str:
    return "—" if pd.isna(rank) else str(int(rank))


def test_report_writes_every_table_and_figure(sweep_dir, tmp_path):
    from matplotlib.image import imread

    from membench.report.compare import unit
    from membench.report.tables import METHOD_LABELS

    report = tmp_path / "report"
    written, skipped = build_report([sweep_dir], report)
    frame, _ = load_results(sweep_dir)
    names = {p.relative_to(report).as_posix() for p in written}
    for table in ("headline", "comparison", "breakdown", "verdict", "analytic", "attribution"):
        assert {f"{table}.md"} | ({f"{table}.tex"} if table != "attribution" else set()) <= names
    for figure in (*figures.FIGURES, "attribution"):
        assert {f"figures/{figure}.png", f"figures/{figure}.pdf"} <= names
    assert all(p.stat().st_size > 0 for p in written)

    # runs.csv: the loaded results, row for row and column for column, bytes as integers.
    csv = pd.read_csv(report / "runs.csv")
    assert list(csv.columns) == list(frame.columns)
    assert csv["run_id"].tolist() == frame["run_id"].tolist()
    for column in ("peak_allocated_bytes", "weight_bytes", "activation_bytes", "saved_tensor_bytes"):
        assert csv[column].tolist() == [int(v) for v in frame[column]], column
    assert csv["status"].tolist() == frame["status"].tolist()

    # Every figure is a real image / PDF, not just bytes.
    for figure in (*figures.FIGURES, "attribution"):
        png = report / "figures" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        height, width = imread(png).shape[:2]
        assert 200 <= height <= 4000 and 300 <= width <= 6000, (figure, width, height)
        pdf = (report / "figures" / f"{figure}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF"), figure

    # The tables: expected columns, one row per configuration of the fixture.
    size = unit(frame)[0]
    finished = frame[frame["status"] == "ok"]
    adapters = frame[frame["kind"] != "full"]
    configurations = sorted({(r.backend, r.model, setting(r), rank_cell(r.rank)) for r in adapters.itertuples()})
    pairs = sorted({(r.model, setting(r), rank_cell(r.rank)) for r in finished.itertuples()
                    if r.kind != "full" and not r.recompute})
    expected = {
        "breakdown": (["model", "method", "r", "setting", "status", f"peak ({size})", f"reserved ({size})",
                       "fragmentation", "weights", "gradients",
                       "optimizer", "activations", "saved for backward", "step (ms)"],
                      sorted((r.model, METHOD_LABELS[r.method], rank_cell(r.rank), setting(r), r.status)
                             for r in frame.itertuples())),
        "comparison": (["model", "setting", "r", f"full ({size})", f"LoRA ({size})", f"LoRA-FA ({size})",
                        f"LoRA+recompute ({size})", "LoRA/LoRA-FA", "LoRA/LoRA-FA reserved",
                        "activations LoRA/LoRA-FA", "full/LoRA-FA",
                        "recompute time"],
                       sorted(c[1:] for c in configurations)),
        "headline": (["model", "setting", f"full ({size})", f"LoRA ({size})", f"LoRA-FA ({size})",
                      f"LoRA+recompute ({size})", "LoRA/LoRA-FA", "full/LoRA-FA"],
                     sorted((model,) for model in MODELS)),
        "verdict": (["model", "setting", "r", "LoRA/LoRA-FA peak", "LoRA/LoRA-FA reserved", "LoRA/LoRA-FA activations",
                     "activation share (LoRA)", "≥ 1.4×"], pairs),
    }
    for name, (columns, rows) in expected.items():
        (header, body), *_ = [t for t in markdown_tables((report / f"{name}.md").read_text()) if t[0][0] == "model"]
        assert header == columns, name
        assert sorted(tuple(row[:len(rows[0])]) for row in body) == rows, name
        assert tex_rows((report / f"{name}.tex").read_text()) == len(body), name
        assert "\\begin{tabular}" in (report / f"{name}.tex").read_text()
    (_, per_run), (korthikanti_header, _) = markdown_tables((report / "analytic.md").read_text())
    assert korthikanti_header == list(analytic.KORTHIKANTI_COLUMNS)
    assert sorted(tuple(row[:4]) for row in per_run) == sorted(
        (r.model, METHOD_LABELS[r.method], rank_cell(r.rank), setting(r)) for r in finished.itertuples())
    assert any(header[0].startswith("module") and body for header, body in
               markdown_tables((report / "attribution.md").read_text()))
    assert "LoRA's peak is at least 1.4×" in (report / "verdict.md").read_text()


def test_analytic_table_covers_every_finished_run(sweep_dir):
    frame, _ = load_results(sweep_dir)
    table = analytic.analytic_vs_measured(frame)
    finished = frame[frame["status"] == "ok"]
    assert sorted(table["run_id"]) == sorted(finished["run_id"])
    # The symbolic walk is exact: 0 bytes off, saved and activations, on every run.
    assert (table["saved_difference"] == 0).all() and (table["activation_difference"] == 0).all()
    assert (table["saved_measured"] == finished.set_index("run_id").loc[table["run_id"], "saved_tensor_bytes"]
            .to_numpy()).all()
    assert (table["korthikanti_ratio"] == table["korthikanti"] / table["saved_measured"]).all()
    text = analytic.analytic_markdown(table)
    assert "## Korthikanti et al.'s formula vs measured" in text
    assert "| " + " | ".join(analytic.KORTHIKANTI_COLUMNS) + " |" in text
    assert len(analytic.korthikanti_by_method(table)) == len(MODELS) * 4  # full, LoRA, LoRA-FA, LoRA+recompute


def test_verdict_counts_the_claim_by_hand(sweep_dir):
    frame, _ = load_results(sweep_dir)
    pairs = verdict.pairs(frame)
    expected = sum(row.lora_over_lora_fa >= 1.4 for row in pairs.itertuples())
    assert f"in {expected} of {len(pairs)} configurations" in verdict.headline(frame)
    assert len(verdict.verdict_table(frame)) == len(pairs)


def test_corrupt_and_foreign_files_are_named_and_skipped(sweep_dir, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in sweep_dir.joinpath("runs").glob("tiny-llama--lora_fa*.json"):
        (mixed / path.name).write_text(path.read_text())
    (mixed / "truncated.json").write_text('{"schema_version": 1, "run_id": ')
    (mixed / "foreign.json").write_text('{"accuracy": 0.91}')
    main([str(mixed), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "truncated.json" in err and "foreign.json" in err
    assert (tmp_path / "out" / "breakdown.md").exists()


def test_validation_table_from_fixture_results(tmp_path):
    runs = tmp_path / "runs"
    for backend in ("cpu", "simulate"):
        write_result(measure(tiny("tiny-llama", "lora", backend=backend)), runs)
    simulated = json.loads(next(runs.glob("*simulate*.json")).read_text())
    gpu = json.loads(json.dumps(simulated))  # a GPU run that needed 1% more than predicted
    gpu["run_id"] = simulated["run_id"].replace("simulate-h100-80gb", "cuda")
    gpu["env"]["backend"] = "cuda"
    gpu["metrics"]["peak_allocated_bytes"] = round(simulated["metrics"]["peak_allocated_bytes"] / 1.01)
    (runs / f"{gpu['run_id']}.json").write_text(json.dumps(gpu))

    frame, _ = load_results(runs)
    pairs = validate.backend_pairs(frame).set_index("measured on")
    on_cpu = pairs[pairs.index.str.startswith("cpu")].iloc[0]
    on_gpu = pairs[pairs.index.str.startswith("cuda")].iloc[0]
    assert on_cpu["peak error"] == 0 and on_cpu["activations error"] == 0  # simulate == real CPU execution
    assert on_gpu["peak error"] == pytest.approx(0.01, abs=1e-6)
    assert on_gpu["weights error"] == 0
    build_report([runs], tmp_path / "report")
    text = (tmp_path / "report" / "validation.md").read_text()
    assert "Against cpu, 1 configurations: worst peak error +0.00%" in text
    assert "Against cuda, 1 configurations: worst peak error +1.00%" in text


def test_maxfit_results_become_a_report_table(sweep_dir, tmp_path):
    from membench import maxfit

    runs = [tiny("tiny-llama", method) for method in ("lora", "lora_fa")]
    budget = measure(tiny("tiny-llama", "lora_fa", "workload.batch_size=5")).metrics["peak_allocated_bytes"]
    rows = maxfit.maxfit_rows(runs, ["batch_size"], [budget], search_cap=64)
    maxfit.write_maxfit(rows, tmp_path / "maxfit", {"test": True})
    written, _ = build_report([sweep_dir], tmp_path / "report", tmp_path / "maxfit")
    text = (tmp_path / "report" / "maxfit.md").read_text()
    assert "lora_fa fits batch 5 where lora fits" in text


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_figure_title_sits_above_every_panel_title(sweep_dir, name):
    """The figure's title is laid out with the panels, not drawn over the top row's titles."""
    import matplotlib.pyplot as plt

    frame, _ = load_results(sweep_dir)
    fig = figures.FIGURES[name](frame)
    try:
        fig.canvas.draw()
        title = fig.get_suptitle() and fig._suptitle.get_window_extent()
        panel_titles = [ax.title.get_window_extent() for ax in fig.axes if ax.get_visible() and ax.get_title()]
        if not title or not panel_titles:
            pytest.skip(f"{name} has no figure title over panel titles")
        assert title.y0 >= max(box.y1 for box in panel_titles), name
    finally:
        plt.close(fig)


def test_reserved_columns_and_verdict_and_old_results_without_them(sweep_dir, tmp_path):
    frame, _ = load_results(sweep_dir)
    simulated = frame[frame["backend"] == "simulate"]
    assert simulated["peak_reserved_bytes"].notna().all() and str(frame["fragmentation_bytes"].dtype) == "Int64"
    table = side_by_side(simulated)
    row = table.iloc[0]
    assert row.reserved_lora_over_lora_fa == pytest.approx(row.reserved_lora / row.reserved_lora_fa)
    assert "LoRA/LoRA-FA reserved" in verdict.verdict_table(frame)
    assert verdict.reserved_effect(frame).startswith("On peak reserved memory")
    breakdown = tables.breakdown_table(frame)
    assert {"reserved (MiB)", "fragmentation"} <= set(breakdown.columns)
    # Results written before reserved memory was modelled: the same report, with dashes.
    old = tmp_path / "runs"
    old.mkdir()
    for path in sweep_dir.glob("runs/*.json"):
        data = json.loads(path.read_text())
        for key in ("peak_reserved_bytes", "fragmentation_bytes", "reserved_segments", "num_alloc_retries"):
            data["metrics"].pop(key, None)
        (old / path.name).write_text(json.dumps(data))
    old_frame, _ = load_results(tmp_path)
    assert verdict.reserved_effect(old_frame).startswith("No ")  # says there is nothing to compare
    assert set(tables.breakdown_table(old_frame)["fragmentation"]) == {"—"}
    assert set(verdict.verdict_table(old_frame)["LoRA/LoRA-FA reserved"]) == {"—"}


def test_a_paged_optimizer_gets_its_column_and_its_setting(sweep_dir, tmp_path):
    """Runs with another optimizer are another setting; the paged column appears only where a run pages."""
    frame, _ = load_results(sweep_dir)
    assert set(frame["optimizer"]) == {"adamw"}
    assert "paged optimizer" not in tables.breakdown_table(frame).columns  # every run pages 0 bytes
    runs = tmp_path / "runs"
    runs.mkdir()
    paged = measure(tiny("tiny-llama", "full", "train.optimizer=paged_adamw_8bit", "model.hf_config.vocab_size=2000",
                         backend="simulate"))
    write_result(paged, runs)
    mixed, _ = load_results(tmp_path)
    breakdown = tables.breakdown_table(mixed)
    assert "peak (MiB)" in breakdown.columns
    assert breakdown["paged optimizer"].iloc[0] == f"{paged.metrics['paged_optimizer_state_bytes'] / (1 << 20):.2f}"
    assert tables.setting_label(mixed.iloc[0]).endswith("paged_adamw_8bit")
