"""One trace, every workload: evaluated Results equal direct simulation byte for byte (membench.trace)."""

from __future__ import annotations

import dataclasses
import pickle
import time

import pytest

from conftest import run_config, tiny
from membench.runner import measure
from membench.trace import (TraceNotGeneral, covered, evaluate, load_or_record, record_trace, simulate_via_trace,
                            trace_key)

# Provenance; the git fields too, because other commits may land between two runs of one test.
PROVENANCE = ("created_at", "wall_time_s", "git_sha", "git_dirty")
# Sizes that are not multiples of 8 or 32, and B, S, T all different.
POINTS = [(2, 5), (3, 33), (7, 77)]
# LoRA ranks the points take in turn (one trace answers every rank: the symbol R), odd and not multiples of 8.
RANKS = (3, 6, 5, 2)


def rank(method: str, point: int) -> tuple[str, ...]:
    """The ``method.rank`` override of the ``point``-th point of a grid (none for full fine-tuning)."""
    return () if method.startswith("full") else (f"method.rank={RANKS[point % len(RANKS)]}",)


def sized(model: str, method: str, batch: int, seq: int, *extra: str):
    return tiny(model, method, f"workload.batch_size={batch}", f"workload.seq_len={seq}", *extra, backend="simulate")


@pytest.fixture(autouse=True)
def _forget_failed_recordings(monkeypatch):
    """Tests patch model code, which the trace key cannot see: no failed recording outlives its test."""
    import membench.trace.cache as cache

    monkeypatch.setattr(cache, "_not_general", {})


def assert_same(evaluated, direct) -> None:
    assert evaluated.metrics == direct.metrics  # peak, every phase peak, breakdowns, saved-tensor splits
    assert evaluated.run_id == direct.run_id
    assert evaluated.config == direct.config
    assert evaluated.status == direct.status
    assert evaluated.env["trace"]["evaluated_from_trace"] is True and evaluated.env["trace"]["record_s"] > 0
    assert {k: v for k, v in evaluated.env.items() if k not in (*PROVENANCE, "trace")} == \
        {k: v for k, v in direct.env.items() if k not in PROVENANCE}


CASES = [
    ("tiny-llama", "lora", ()),
    ("tiny-llama", "full", ("train.precision=fp16",)),
    ("tiny-llama", "lora_fa_recompute", ("train.precision=bf16", "method.lora_dropout=0.1")),
    ("tiny-llama", "full_recompute", ("model.attn_implementation=eager", "train.precision=bf16-autocast")),
    ("tiny-llama", "lora_fa", ("model.attn_implementation=eager",)),  # eager's F.dropout(p=0) keeps its input
    ("tiny-roberta", "full", ("model.attn_implementation=eager",)),
    ("tiny-roberta", "lora_recompute", ("train.precision=fp16", "method.lora_dropout=0.1")),
    ("tiny-t5", "lora", ("model.attn_implementation=eager", "method.lora_dropout=0.1")),
    ("tiny-t5", "full_recompute", ("model.attn_implementation=eager", "train.precision=bf16")),
]


@pytest.mark.parametrize(("model", "method", "extra"), CASES, ids=["-".join((m, k, *e)) for m, k, e in CASES])
def test_trace_equals_direct_simulation(model, method, extra):
    trace = record_trace(sized(model, method, 4, 16, *extra))
    assert trace.validity["B"] == (2, 1 << 20) and trace.validity["S"][0] == 2
    points = POINTS
    if (model, method) == ("tiny-llama", "lora"):  # one full grid
        points = [(b, s) for b in (2, 3, 7) for s in (5, 33, 77)]
    for point, (batch, seq) in enumerate(points):
        target = ("workload.target_len=9",) if model == "tiny-t5" and batch == 3 else ()
        run = sized(model, method, batch, seq, *extra, *target, *rank(method, point))
        assert covered(run) is None
        assert_same(evaluate(trace, run), measure(run))


DECODERS = [("qwen2", "lora", "bf16"), ("qwen3", "lora_fa_recompute", "bf16-autocast"), ("mistral", "full", "fp32"),
            ("phi3", "lora", "bf16"), ("gpt2", "lora_fa", "bf16")]


@pytest.mark.parametrize(("family", "method", "precision"), DECODERS, ids=[d[0] for d in DECODERS])
def test_trace_covers_current_decoders(family, method, precision, tmp_path):
    """The tiny variants of tests/test_families.py (grouped-query attention, all-linear targets, GPT-2's Conv1D)."""
    import json

    from test_families import FAMILIES

    task, values = FAMILIES[family]
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(values))

    def run(batch: int, seq: int, point: int = 3):
        return run_config("model=custom", f"model.config_path={path}", f"model.task={task}", f"method={method}",
                          "backend.name=simulate", f"train.precision={precision}", f"workload.batch_size={batch}",
                          f"workload.seq_len={seq}", *rank(method, point))

    trace = record_trace(run(4, 16))
    assert trace.validity["S"] == (2, 1 << 20)
    assert trace.validity["R"] == ((0, 1 << 20) if method == "full" else (2, 1 << 20))
    for point, (batch, seq) in enumerate([(2, 5), (3, 33), (7, 57)]):  # the tiny configs hold 64 positions
        assert covered(run(batch, seq, point)) is None
        assert_same(evaluate(trace, run(batch, seq, point)), measure(run(batch, seq, point)))


SPLIT = [("gemma2", "lora_fa", "bf16"), ("gemma3_text", "lora", "bf16"), ("bert", "lora_fa", "fp32"), ("deberta-v2", "lora", "fp32"),
         ("mixtral", "lora", "bf16"), ("qwen3_moe", "lora_fa_recompute", "bf16")]


@pytest.mark.parametrize(("family", "method", "precision"), SPLIT, ids=[case[0] for case in SPLIT])
def test_trace_covers_split_families(family, method, precision, tmp_path):
    """Gemma 2 (eager attention, soft-capping, sliding window), Gemma 3 (sliding window, sdpa's padded log-sum-exp), BERT, DeBERTa-v3 (its position buckets bound S) and
    the MoE decoders (PEFT's target_parameters on the fused experts): the traces a cache keeps answer exactly."""
    import json

    from test_families import FAMILIES

    task, values = FAMILIES[family]
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(values))

    def run(batch: int, seq: int, point: int):
        return run_config("model=custom", f"model.config_path={path}", f"model.task={task}", f"method={method}",
                          "backend.name=simulate", f"train.precision={precision}", f"workload.batch_size={batch}",
                          f"workload.seq_len={seq}", *rank(method, point))

    for point, (batch, seq) in enumerate([(4, 16), (2, 5), (3, 33), (7, 57), (2, 64)]):
        assert covered(run(batch, seq, point)) is None
        assert_same(simulate_via_trace(run(batch, seq, point), cache_dir=str(tmp_path / "traces")),
                    measure(run(batch, seq, point)))
    traces = [trace for path in (tmp_path / "traces").glob("*.trace.pickle") for trace in pickle.loads(path.read_bytes())]
    # every rank, also for the MoE experts' fused weights (PEFT's ParamWrapper: r x experts rows)
    assert {trace.validity["R"] for trace in traces} == {(2, 1 << 20)}


def test_trace_is_general_whatever_the_hints():
    a = record_trace(sized("tiny-llama", "lora_fa", 2, 5, "method.rank=2"))
    b = record_trace(sized("tiny-llama", "lora_fa", 9, 40, "method.rank=7"))
    run = sized("tiny-llama", "lora_fa", 5, 21, "method.rank=4")
    assert evaluate(a, run).metrics == evaluate(b, run).metrics


@pytest.mark.parametrize(("model", "symbols", "recorded", "others"), [
    ("tiny-t5", "B", (4, 16, "method.rank=4"), [(2, 16, "method.rank=4"), (7, 16, "method.rank=4")]),
    ("tiny-llama", "SR", (3, 16, "method.rank=4"), [(3, 5, "method.rank=3"), (3, 33, "method.rank=6")])],
    ids=["B-only", "S-and-R"])
def test_a_trace_of_fewer_symbols_answers_its_own_values_of_the_others(model, symbols, recorded, others):
    """backend.trace_symbols leaves sizes concrete: the trace holds for the recorded run's values of them
    (and says so), and is still equal to direct simulation over the sizes it kept symbolic."""
    trace = record_trace(sized(model, "lora", *recorded, f"backend.trace_symbols={symbols}"))
    batch, seq, rank_override = recorded
    fixed = {"B": batch, "S": seq, "T": seq, "R": int(rank_override.split("=")[1])}
    for name, value in fixed.items():
        symbolic = name in symbols or (name == "T" and model != "tiny-t5")
        assert (trace.validity[name] == (value, value)) is not symbolic
    for batch, seq, rank_override in others:
        run = sized(model, "lora", batch, seq, rank_override)
        assert_same(evaluate(trace, run), measure(run))
    outside = "B=5" if "B" not in symbols else "S=17"
    run = sized(model, "lora", 5 if outside == "B=5" else batch, 17 if outside == "S=17" else seq, rank_override)
    assert trace.contains(run) == f"{outside} is outside the trace's validity range [{fixed[outside[0]]}, {fixed[outside[0]]}]"


def test_a_rank_a_direct_run_refuses_is_refused_from_a_trace_too():
    from membench.errors import ConfigError

    trace = record_trace(sized("tiny-llama", "lora", 3, 33))
    wide = sized("tiny-llama", "lora", 3, 33, "method.rank=500")
    with pytest.raises(ConfigError) as direct:
        measure(wide)
    with pytest.raises(ConfigError) as evaluated:
        evaluate(trace, wide)
    assert str(evaluated.value) == str(direct.value) and "method.rank=500 is not below" in str(direct.value)


def test_rank_one_gets_a_trace_of_its_own(tmp_path):
    general = record_trace(sized("tiny-llama", "lora", 3, 33, "method.rank=4"))
    one = sized("tiny-llama", "lora", 3, 33, "method.rank=1")
    assert general.contains(one) == "R=1 is outside the trace's validity range [2, 1048576]"
    assert_same(simulate_via_trace(one, cache_dir=str(tmp_path)), measure(one))
    [own] = [trace for path in tmp_path.glob("*.trace.pickle") for trace in pickle.loads(path.read_bytes())]
    assert own.validity["R"] == (1, 1)


def test_traces_of_one_key_recorded_side_by_side_are_all_kept(tmp_path, monkeypatch):
    """Two workers of a sweep record traces of one key (here S % 32 == 0 and the rest) at once: the
    one that writes last re-reads the file under a lock instead of overwriting what the other wrote."""
    import membench.trace.record as recording

    aligned, other = sized("tiny-roberta", "lora", 2, 32), sized("tiny-roberta", "lora", 2, 33)
    record = recording.record_trace

    def record_while_another_worker_writes(run):
        trace = record(run)
        if run is other:
            load_or_record(aligned, str(tmp_path))  # the other worker finishes first
        return trace

    monkeypatch.setattr(recording, "record_trace", record_while_another_worker_writes)
    load_or_record(other, str(tmp_path))
    [path] = tmp_path.glob("*.trace.pickle")
    assert sorted(trace.hints[1] for trace in pickle.loads(path.read_bytes())) == [32, 33]


def test_size_one_and_other_backends_go_direct(capsys, tmp_path):
    assert "batch size 1" in covered(sized("tiny-llama", "lora", 1, 16))
    assert "sequence length 1" in covered(sized("tiny-llama", "lora", 2, 1))
    assert "target length 1" in covered(sized("tiny-t5", "lora", 2, 8, "workload.target_len=1"))
    assert "measures" in covered(tiny("tiny-llama", "lora", backend="cpu"))
    assert covered(sized("tiny-llama", "lora", 2, 16, "backend.trace=off")) == "backend.trace=off"
    assert covered(sized("tiny-t5", "lora", 2, 16)) is None  # its guard on S % 32 splits the trace instead
    run = sized("tiny-llama", "lora", 1, 16)
    result = simulate_via_trace(run, cache_dir=str(tmp_path))
    assert "trace" not in result.env and result.status.state == "ok"
    assert "simulating directly: batch size 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing recorded


def test_cache_key_changes_with_everything_but_the_sizes():
    base = sized("tiny-t5", "lora", 2, 16)
    same = [sized("tiny-t5", "lora", 7, 77), sized("tiny-t5", "lora", 3, 5, "workload.target_len=9"),
            # the rank is the symbol R; alpha only sets the scale alpha / rank
            sized("tiny-t5", "lora", 2, 16, "method.rank=4"), sized("tiny-t5", "lora", 2, 16, "method.alpha=3"),
            sized("tiny-t5", "lora", 2, 16, "results_dir=elsewhere", "force=true", "backend.trace=off",
                  "backend.trace_symbols=B"),
            # cards with the H100's cuBLAS workspaces (compute capability 9.x and newer), allocator settings
            sized("tiny-t5", "lora", 2, 16, "backend.device=h200-141gb"),
            sized("tiny-t5", "lora", 2, 16, "backend.device=b200-180gb", "backend.alloc_conf=expandable_segments:True"),
            sized("tiny-t5", "lora", 2, 16, "backend.device=custom", "backend.device_memory_gib=12",
                  "backend.compute_capability=9.0")]
    assert {trace_key(run) for run in same} == {trace_key(base)}
    changed = ["model=tiny-llama", "method=full", "method=lora_fa", "method.lora_dropout=0.1",
               "method.gradient_checkpointing=true", "train.precision=bf16", "train.optimizer_impl=fused",
               "model.attn_implementation=eager", "backend.device=a100-40gb", "workload.seed=1",
               "workload.warmup_steps=0", "model.hf_config.d_ff=96", "backend.cuda_semantics=false"]
    keys = {trace_key(base)}
    for override in changed:
        run = run_config("model=tiny-t5", "method=lora", "backend.name=simulate", "workload.batch_size=2",
                         "workload.seq_len=16", override)
        keys.add(trace_key(run))
    assert len(keys) == len(changed) + 1


@pytest.mark.parametrize("other", [["backend.device=h200-141gb"], ["backend.device=custom", "backend.device_memory_gib=0.5",
                                                                  "backend.compute_capability=9.0"],
                                   ["backend.alloc_conf=expandable_segments:True"]], ids=["h200", "tiny-card", "expandable"])
def test_one_trace_answers_every_card_with_the_same_workspaces(other):
    """Recorded on the H100 profile, evaluated for another card or allocator setting: equal to direct there
    (capacity, OOM verdict, device name and reserved memory are the run's own)."""
    trace = record_trace(sized("tiny-llama", "lora", 4, 16))
    run = sized("tiny-llama", "lora", 3, 33, *other)
    evaluated = evaluate(trace, run)
    assert_same(evaluated, measure(run))
    assert evaluated.status.state == ("oom" if "backend.device_memory_gib=0.5" in other else "ok")  # the CUDA context


def test_cache_records_once_and_survives_a_corrupt_file(tmp_path, monkeypatch, capsys):
    run = sized("tiny-llama", "lora_fa", 3, 10)
    first = load_or_record(run, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith(trace_key(run))
    import membench.trace.record as recording

    recorded = []
    real = recording.record_trace
    monkeypatch.setattr(recording, "record_trace", lambda r: recorded.append(r) or real(r))
    other = sized("tiny-llama", "lora_fa", 6, 50)
    started = time.perf_counter()
    loaded = load_or_record(other, tmp_path)
    assert recorded == [] and time.perf_counter() - started < 5
    assert evaluate(loaded, other).metrics == evaluate(first, other).metrics
    files[0].write_bytes(b"not a pickle")
    again = load_or_record(other, tmp_path)
    assert len(recorded) == 1 and "unreadable" in capsys.readouterr().err
    assert evaluate(again, other).metrics == evaluate(first, other).metrics
    result = simulate_via_trace(other, cache_dir=str(tmp_path))
    assert result.env["trace"]["key"] == trace_key(other) and len(recorded) == 1


@pytest.fixture
def mlp_depends_on_length(monkeypatch):
    """Patch LLaMA's MLP so its ops depend on the sequence length (``rule(S)`` true: one more copy)."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaMLP.forward

    def install(rule):
        def forward(self, x):
            if rule(x.shape[1]):
                x = x.clone()
            return original(self, x)

        monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)

    return install


def test_a_guard_beyond_bounds_falls_back(mlp_depends_on_length, tmp_path, capsys):
    mlp_depends_on_length(lambda length: (length // 3) * (length // 5) > 2 * length)  # neither a bound nor periodic
    run = sized("tiny-llama", "lora", 3, 16)
    with pytest.raises(TraceNotGeneral, match="guard"):
        record_trace(run)
    odd = sized("tiny-llama", "lora", 3, 47)
    result = simulate_via_trace(odd, cache_dir=str(tmp_path))
    assert "trace" not in result.env and "simulating directly" in capsys.readouterr().err
    assert result.metrics == measure(odd).metrics


def test_a_periodic_guard_splits_the_trace_by_residue_class(mlp_depends_on_length, tmp_path):
    mlp_depends_on_length(lambda length: length % 3 == 1)
    trace = load_or_record(sized("tiny-llama", "lora", 3, 16), tmp_path)
    assert trace.classes == {"S": (3, (1,))} and trace.validity["S"] == (2, 1 << 20)
    assert_same(evaluate(trace, sized("tiny-llama", "lora", 5, 34)), measure(sized("tiny-llama", "lora", 5, 34)))
    other = sized("tiny-llama", "lora", 2, 18)
    assert trace.contains(other) == "S=18 is outside the trace's residue classes (S % 3 in {1})"
    with pytest.raises(TraceNotGeneral, match="residue"):
        evaluate(trace, other)
    assert load_or_record(other, tmp_path).classes == {"S": (3, (0, 2))}
    assert_same(simulate_via_trace(other, cache_dir=str(tmp_path)), measure(other))


def test_a_bound_on_one_size_becomes_the_validity_range(mlp_depends_on_length, tmp_path):
    mlp_depends_on_length(lambda length: length > 40)
    short = sized("tiny-llama", "lora", 3, 16)
    trace = load_or_record(short, tmp_path)
    assert trace.validity["S"] == (2, 40)
    assert_same(evaluate(trace, sized("tiny-llama", "lora", 5, 33)), measure(sized("tiny-llama", "lora", 5, 33)))
    long = sized("tiny-llama", "lora", 3, 77)
    assert "outside" in trace.contains(long)
    with pytest.raises(TraceNotGeneral, match="outside"):
        evaluate(trace, long)
    second = load_or_record(long, tmp_path)  # the trace is split: a second one for S > 40
    assert second.validity["S"] == (41, 1 << 20)
    assert_same(simulate_via_trace(long, cache_dir=str(tmp_path)), measure(long))


@pytest.mark.slow
def test_llama_7b_lora_fa_from_one_trace():
    """LLaMA-7B's widths (4096, 11008, r 64): sizes where the allocator's large-block rounding applies. Four of its
    32 layers: every layer records the same events, and a trace of all 32 costs as much as 8 more tests."""
    def run(batch: int, seq: int, rank: int):
        return run_config("model=llama-7b", "model.hf_config.num_hidden_layers=4", "method=lora_fa",
                          f"method.rank={rank}", "train.precision=bf16", "backend.name=simulate",
                          f"workload.batch_size={batch}", f"workload.seq_len={seq}")

    trace = record_trace(run(16, 512, 64))
    # Its own hints are checked by record_trace; its speed is a benchmark in the README, not asserted here.
    assert_same(evaluate(trace, run(3, 77, 24)), measure(run(3, 77, 24)))


PADDED = [("tiny-t5", "full", ()), ("tiny-roberta", "lora_fa_recompute", ())]  # T5's bias gradient; recompute


@pytest.mark.parametrize(("model", "method", "extra"), PADDED, ids=["-".join((m, k, *e)) for m, k, e in PADDED])
def test_padded_attention_splits_the_trace_by_residue_class(model, method, extra, tmp_path):
    """CUDA's memory-efficient kernel (T5's bias, RoBERTa in fp32) pads its log-sum-exp rows to 32: one trace per class."""
    odd = load_or_record(sized(model, method, 4, 16, *extra), tmp_path)
    assert odd.classes["S"] == (32, tuple(range(1, 32)))  # the guard Ne(32 * ceil(S / 32), S)
    whole = sized(model, method, 3, 64, *extra)
    assert "residue classes (S % 32 in {1-31})" in odd.contains(whole)
    even = load_or_record(whole, tmp_path)
    assert even.classes["S"] == (32, (0,)) and even is not odd
    for batch, seq in [(2, 5), (3, 64), (7, 77), (5, 96)]:
        target = ("workload.target_len=9",) if model == "tiny-t5" and batch == 3 else ()
        run = sized(model, method, batch, seq, *extra, *target)
        assert covered(run) is None
        assert_same(simulate_via_trace(run, cache_dir=str(tmp_path)), measure(run))
    recorded = [trace for path in tmp_path.glob("*.trace.pickle") for trace in pickle.loads(path.read_bytes())]
    assert len(recorded) == (3 if model == "tiny-t5" else 2)  # T5's decoder pads too: T = 9 is another class


def test_periodic_guards_are_proven_not_sampled():
    import sympy
    from torch.utils._sympy.functions import FloorDiv, PythonMod

    from membench.trace.periodic import MAX_PERIOD, combine, period, residues

    s, b = sympy.Symbol("S", integer=True, positive=True), sympy.Symbol("B", integer=True, positive=True)
    padded = sympy.Eq(-32 * FloorDiv(-s, 32), s)
    assert period(padded, s) == 32 and residues(padded, s, 32, 2) == (0,)
    assert period(sympy.Eq(PythonMod(s, 6), 1), s) == 6
    assert period(sympy.Gt(FloorDiv(3 * s, 5), FloorDiv(s, 2)), s) is None  # grows with S: not periodic
    assert period(sympy.Eq(PythonMod(b * s, 2), 0), s) is None  # two symbols
    assert period(sympy.Eq(PythonMod(s, 2 * MAX_PERIOD), 0), s) is None  # too long a period
    classes = {}
    combine(classes, "S", 4, (0, 1))
    combine(classes, "S", 6, (1,))
    assert classes == {"S": (12, (1,))}  # S % 4 in {0, 1} and S % 6 == 1


# 4-bit base weights: bitsandbytes' fused kernel takes at most 1536 rows, so B*S = 1536 splits the trace.
# DoRA builds and drops a graph for its weight norm inside forward: what it packed is not saved.
QUANTIZED = [("tiny-llama", "qlora", ("train.precision=bf16",), [(3, 33), (16, 128), (9, 200)]),
             ("tiny-llama", "qdora_recompute", ("train.precision=bf16", "model.quantization=fp4"), [(7, 77), (12, 130)]),
             ("tiny-roberta", "dora", (), [(2, 5), (7, 77)])]


@pytest.mark.parametrize(("model", "method", "extra", "points"), QUANTIZED, ids=[q[1] for q in QUANTIZED])
def test_trace_covers_dora_and_4bit(model, method, extra, points, tmp_path):
    for point, (batch, seq) in enumerate(points):
        run = sized(model, method, batch, seq, *extra, *rank(method, point))
        assert covered(run) is None
        assert_same(simulate_via_trace(run, cache_dir=str(tmp_path)), measure(run))
    traces = [trace for path in tmp_path.glob("*.trace.pickle") for trace in pickle.loads(path.read_bytes())]
    if method.startswith("q"):  # a 4-bit base: one trace each side of B*S = 1536
        assert sorted(str(trace.conditions) for trace in traces) == ["(B*S <= 1536,)", "(B*S > 1536,)"]
        below = next(trace for trace in traces if trace.hints[0] * trace.hints[1] <= 1536)
        assert below.contains(sized(model, method, 16, 128, *extra)) == \
            "B=16, S=128 is outside the trace's condition B*S <= 1536"
    else:
        assert len(traces) == 1 and traces[0].conditions == ()


def test_trace_covers_8bit_base_weights_and_what_their_matmul_keeps_on_ctx(tmp_path):
    """bitsandbytes' 8-bit matmul keeps its input as a ctx attribute, outside saved tensors: the trace
    evaluates ctx_kept_bytes_by_function too (one polynomial per function), and answers every rank."""
    import json

    extra = ("train.precision=bf16", "model.quantization=int8")
    for point, (batch, seq) in enumerate([(4, 16), (3, 33), (9, 200)]):
        run = sized("tiny-llama", "qlora_fa_recompute", batch, seq, *extra, *rank("qlora", point))
        assert covered(run) is None
        evaluated, direct = simulate_via_trace(run, cache_dir=str(tmp_path)), measure(run)
        assert_same(evaluated, direct)
        assert direct.metrics["ctx_kept_bytes_by_function"]  # the 8-bit matmul's input, by function
        assert json.dumps(evaluated.metrics) == json.dumps(direct.metrics)  # in the same order
    traces = [trace for path in tmp_path.glob("*.trace.pickle") for trace in pickle.loads(path.read_bytes())]
    assert len(traces) == 1 and "ctx_kept_bytes_by_function" in traces[0].metric_sizes


def test_polynomial_inequalities_become_conditions_and_nothing_else_does():
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    from membench.trace.symbolic import polynomial_condition

    b, s = sympy.Symbol("B", integer=True, positive=True), sympy.Symbol("S", integer=True, positive=True)
    assert polynomial_condition(b * s <= 1536, (b, s))
    assert polynomial_condition(sympy.Ne(b * s * s, 4 * s + 7), (b, s))
    assert not polynomial_condition(sympy.Eq(b * s, 1536), (b, s))  # a curve, not a region
    assert not polynomial_condition(FloorDiv(s, 3) * b > 2 * s, (b, s))  # a division: not a polynomial
    assert not polynomial_condition(b * s <= sympy.Symbol("x"), (b, s))  # a symbol that is not a size


def test_a_recording_skips_only_inplace_foreach_ops_whose_lists_match_and_adds_no_guard():
    """What lets the symbolic step skip the optimizer's in-place foreach ops (membench.trace.symbolic)."""
    import torch
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from membench.compat import FakeTensorMode
    from membench.trace.symbolic import inplace_foreach_without_effect

    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)
    template = mode.from_tensor(torch.empty(3, 5), source=ConstantSource("sizes"),
                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 2))
    rows, cols = template.shape
    with mode:
        params = [torch.empty(rows, cols), torch.empty(cols)]
        moments = [torch.empty(rows, cols), torch.empty(cols)]
        halves = [torch.empty(rows, cols, dtype=torch.bfloat16), torch.empty(cols, dtype=torch.bfloat16)]
        broadcast = [torch.empty(1, cols), torch.empty(cols)]
        scalar = torch.empty(())
    aten = torch.ops.aten
    assert inplace_foreach_without_effect(aten._foreach_lerp_.Scalar, (params, moments, 0.1), None)
    assert inplace_foreach_without_effect(aten._foreach_addcdiv_.Scalar, (params, moments, moments, 2.0), None)
    assert inplace_foreach_without_effect(aten._foreach_mul_.Scalar, (params, 0.5), None)
    assert not inplace_foreach_without_effect(aten._foreach_sqrt.default, (params,), None)  # allocates its results
    assert not inplace_foreach_without_effect(aten._foreach_lerp_.Scalar, (params, halves, 0.1), None)  # dtypes differ
    assert not inplace_foreach_without_effect(aten._foreach_lerp_.Scalar, (params, broadcast, 0.1), None)  # sizes differ
    assert not inplace_foreach_without_effect(aten._foreach_mul_.Tensor, (params, scalar), None)  # a tensor outside a list
    assert not inplace_foreach_without_effect(aten.add_.Tensor, (params[0], moments[0]), None)  # not a foreach op
    assert not shape_env.guards  # deciding compared expressions, not sizes


def _as_polynomials(trace) -> dict:
    """A trace's fields with every size index replaced by its expanded expression (the form is not part of a trace)."""
    import sympy

    def expanded(index):
        return None if index < 0 else sympy.expand(trace.polynomials.expressions[index])

    fields = {field.name: getattr(trace, field.name) for field in dataclasses.fields(trace)
              if field.name not in ("record_s", "polynomials", "kinds", "sizes", "frees", "saved", "metric_sizes")}
    return {**fields, "kinds": trace.kinds.tolist(), "frees": trace.frees.tolist(),
            "sizes": [expanded(index) for index in trace.sizes.tolist()],
            "saved": [(expanded(index), module, op) for index, module, op in trace.saved],
            "metric_sizes": {metric: expanded(index) if isinstance(index, int) else
                             {name: expanded(i) for name, i in index.items()} for metric, index in trace.metric_sizes.items()}}


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-llama"])
def test_cheap_fake_views_record_the_same_trace(model, monkeypatch):
    """membench.compat.cheap_fake_views changes how a recording makes views, not what it records.

    Each size is the same polynomial both ways; its written form may differ (which SymInt a view
    holds decides how torch writes sizes derived from it), and so may the order of the table."""
    import contextlib

    import membench.trace.symbolic as symbolic
    from membench.compat import torch_fake_views

    used = []

    @contextlib.contextmanager
    def counted():
        with torch_fake_views.cheap_fake_views() as counts:
            yield counts
        used.append(dict(counts))

    run = sized(model, "lora_recompute", 3, 20)
    monkeypatch.setattr(symbolic, "cheap_fake_views", counted)
    cheap = record_trace(run)
    assert used and used[0]["cached"] > 0 and used[0]["remembered"] > 0
    monkeypatch.setattr(symbolic, "cheap_fake_views", contextlib.nullcontext)
    plain = record_trace(run)
    assert _as_polynomials(cheap) == _as_polynomials(plain)
