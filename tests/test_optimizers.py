"""The optimizers people use (train.optimizer): state bytes from their real code, simulate == cpu, exact sizes.

Expected sizes are computed from the trainable parameters' shapes and, for bitsandbytes, from the sizes
membench reads out of its source (:func:`membench.compat.eight_bit_layout`): block size, 8-bit threshold,
paging threshold, quantisation-map length. Each figure is rounded as the allocator rounds each storage.
"""

from __future__ import annotations

import math
import sys

import pytest

from conftest import run_config, tiny
from membench.allocator import allocator_bytes
from membench.backends.cpu import CpuBackend
from membench.compat import eight_bit_layout
from membench.errors import ConfigError
from membench.plan import plan
from membench.runner import build, measure
from membench.summary import summarize
from test_simulate import assert_simulate_equals_cpu

#: tiny-llama with a vocabulary of 2000: its embedding and head (128,000 elements) are above bitsandbytes'
#: paging threshold, every block weight below it.
PAGED_VOCAB = "model.hf_config.vocab_size=2000"
#: tiny-llama twice as wide, rank 32: the A matrices (32 x 128, 32 x 256) reach bitsandbytes' 8-bit threshold,
#: the B matrices of k/v (64 x 32) do not.
WIDE_LORA = ("model.hf_config.hidden_size=128", "model.hf_config.intermediate_size=256", "method.rank=32")

CASES = [
    ("lora", ("train.optimizer=adamw_8bit", *WIDE_LORA)),  # 8-bit and fp32 adapter state side by side
    ("full", ("train.optimizer=adamw_8bit", "train.precision=bf16")),
    ("full", ("train.optimizer=adamw_8bit", "workload.warmup_steps=0")),  # state allocated in the measured step
    ("full", ("train.optimizer=paged_adamw_8bit", PAGED_VOCAB)),
    ("full", ("train.optimizer=adafactor",)),
    ("lora", ("train.optimizer=adafactor", "train.precision=bf16")),
    ("full", ("train.optimizer=sgd",)),
    ("lora_fa", ("train.optimizer=sgd", "train.optimizer_impl=fused")),
    ("full", ("train.optimizer=sgd", "train.momentum=0")),
]


@pytest.mark.parametrize(("method", "extra"), CASES, ids=["-".join((m, *e)) for m, e in CASES])
def test_simulate_equals_cpu(method, extra):
    real = measure(tiny("tiny-llama", method, *extra, backend="cpu"))
    simulated = measure(tiny("tiny-llama", method, *extra, backend="simulate"))
    assert_simulate_equals_cpu(real, simulated)
    assert simulated.metrics["paged_optimizer_state_bytes"] == real.metrics["paged_optimizer_state_bytes"]
    # The reserved-memory replay: simulate's warm-up (primed, or real for Adafactor) leaves the allocator as cpu's
    # real warm-up steps do; the workspaces open segments of their own, so fragmentation is equal.
    assert simulated.metrics["fragmentation_bytes"] == real.metrics["fragmentation_bytes"]
    assert simulated.metrics["optimizer_state_bytes"] > 0 or "train.momentum=0" in extra


def trainable(*overrides: str) -> list:
    """The trainable parameters of a tiny-llama run, built for real on the CPU (tied weights once)."""
    model, _ = build(plan(tiny("tiny-llama", *overrides)), CpuBackend())
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def eight_bit_state(params, paged: bool = False) -> tuple[int, int]:
    """(allocated, paged) bytes of bitsandbytes' AdamW 8-bit state for ``params``."""
    layout = eight_bit_layout()
    allocated = paged_bytes = 0
    quantized = False
    for p in params:
        if p.numel() < layout.min_8bit_size:  # fp32 state1 and state2
            allocated += 2 * allocator_bytes(4 * p.numel())
            continue
        quantized = True
        blocks = math.ceil(p.numel() / layout.blocksize)
        allocated += 2 * allocator_bytes(4 * blocks)  # absmax1, absmax2: one fp32 per block
        if paged and p.numel() >= layout.paged_min_numel:
            paged_bytes += 2 * p.numel()  # uint8 state1, state2 in managed memory
        else:
            allocated += 2 * allocator_bytes(p.numel())  # uint8 state1, state2
    if quantized:
        allocated += 2 * allocator_bytes(4 * layout.qmap_numel)  # the two maps, copied to the device once
    return allocated, paged_bytes


@pytest.mark.parametrize("overrides", [("full",), ("lora", *WIDE_LORA), ("full", "train.precision=bf16")],
                         ids=["full", "lora-wide-r32", "full-bf16"])
def test_8bit_adamw_state_is_2_bytes_per_parameter_plus_block_statistics(overrides):
    result = measure(tiny("tiny-llama", *overrides, "train.optimizer=adamw_8bit", backend="simulate"))
    params = trainable(*overrides)
    layout = eight_bit_layout()
    sizes = {p.numel() >= layout.min_8bit_size for p in params}
    assert sizes == {True, False}  # both paths run: 8-bit, and fp32 below min_8bit_size
    assert result.metrics["optimizer_state_bytes"] == eight_bit_state(params)[0]
    assert result.metrics["paged_optimizer_state_bytes"] == 0


def test_paged_state_is_outside_allocated_and_is_its_own_figure():
    paged = measure(tiny("tiny-llama", "full", "train.optimizer=paged_adamw_8bit", PAGED_VOCAB, backend="simulate"))
    plain = measure(tiny("tiny-llama", "full", "train.optimizer=adamw_8bit", PAGED_VOCAB, backend="simulate"))
    params = trainable("full", PAGED_VOCAB)
    allocated, paged_bytes = eight_bit_state(params, paged=True)
    assert paged_bytes > 0
    assert paged.metrics["paged_optimizer_state_bytes"] == paged_bytes
    assert paged.metrics["optimizer_state_bytes"] == allocated
    # What paging takes out of the caching allocator, it takes out of every peak that holds the state.
    moved = plain.metrics["optimizer_state_bytes"] - paged.metrics["optimizer_state_bytes"]
    layout = eight_bit_layout()
    assert moved == sum(2 * allocator_bytes(p.numel()) for p in params if p.numel() >= layout.paged_min_numel)
    for phase, peak in plain.metrics["phase_peak_bytes"].items():
        assert paged.metrics["phase_peak_bytes"][phase] == peak - moved
    line = summarize(paged)
    assert "adamw_8bit" in line and "paged optimizer state" in line and "outside the peak" in line


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adafactor_state_is_its_factored_second_moment(precision):
    """Per weight: a row and a column vector (a matrix) or a full copy (a vector), fp32, plus its RMS (0-dim).

    Trainer's settings leave beta1 unset, so there is no first moment.
    """
    overrides = ("full", f"train.precision={precision}")
    result = measure(tiny("tiny-llama", *overrides, "train.optimizer=adafactor", backend="simulate"))
    expected = 0
    for p in trainable(*overrides):
        shape = tuple(p.shape)
        if len(shape) >= 2:
            expected += allocator_bytes(4 * math.prod(shape[:-1])) + allocator_bytes(4 * math.prod(shape[:-2] + shape[-1:]))
        else:
            expected += allocator_bytes(4 * p.numel())
        expected += allocator_bytes(4)  # state["RMS"]: a 0-dim fp32 tensor
    assert result.metrics["optimizer_state_bytes"] == expected


@pytest.mark.parametrize(("momentum", "buffers"), [(None, 1), ("0.5", 1), ("0", 0)])
def test_sgd_momentum_is_one_buffer_per_trainable_parameter(momentum, buffers):
    extra = () if momentum is None else (f"train.momentum={momentum}",)
    run = tiny("tiny-llama", "lora", "train.optimizer=sgd", *extra, backend="simulate")
    assert run.train.momentum == (0.9 if momentum is None else float(momentum))
    result = measure(run)
    expected = sum(allocator_bytes(p.element_size() * p.numel()) for p in trainable("lora"))
    assert result.metrics["optimizer_state_bytes"] == buffers * expected


def test_an_8bit_optimizer_without_bitsandbytes_fails_before_any_model(monkeypatch):
    import membench.runner

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # "import bitsandbytes" raises ImportError
    monkeypatch.setattr(membench.runner, "build", lambda *args: pytest.fail("a model was built"))
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        with pytest.raises(ConfigError) as error:
            run_config("model=tiny-llama", f"train.optimizer={name}")
        assert f"train.optimizer={name} needs bitsandbytes" in str(error.value)
        assert "adamw, adafactor or sgd" in str(error.value)
    assert run_config("model=tiny-llama", "train.optimizer=adafactor").train.optimizer == "adafactor"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.optimizer=adam"], "train.optimizer='adam' is not supported; choose one of: adamw, adamw_8bit, "
                               "paged_adamw_8bit, adafactor, sgd"),
    (["train.optimizer=adafactor", "train.optimizer_impl=fused"],
     "train.optimizer=adafactor has one implementation"),
    (["train.optimizer=adamw_8bit", "train.optimizer_impl=for_loop"], "train.optimizer_impl applies to adamw, sgd"),
    (["train.momentum=0.9"], "train.momentum=0.9 applies to train.optimizer=sgd only, not adamw"),
    (["train.optimizer=sgd", "train.momentum=1.5"], "train.momentum=1.5 must be a number in [0, 1)"),
    (["method=lora_fa", "method.lorafa_optimizer=true", "train.optimizer=sgd"],
     "method.lorafa_optimizer=true is PEFT's own AdamW"),
])
def test_bad_optimizer_settings_are_named(overrides, expected):
    with pytest.raises(ConfigError) as error:
        run_config(*overrides)
    assert expected in str(error.value)


TRACED = [("lora", ("train.optimizer=adamw_8bit", *WIDE_LORA)), ("full", ("train.optimizer=paged_adamw_8bit", PAGED_VOCAB)),
          ("lora_fa", ("train.optimizer=sgd",)), ("full", ("train.optimizer=adafactor", "train.precision=bf16")),
          ("lora_fa", ("method.lorafa_optimizer=true",))]  # PEFT's LoRA-FA AdamW: its R x R terms, at every rank


@pytest.mark.parametrize(("method", "extra"), TRACED, ids=["-".join((m, e[0])) for m, e in TRACED])
def test_trace_covers_optimizers(method, extra):
    """membench.trace.coverage.OPTIMIZERS: one trace answers every workload as direct simulation does."""
    from test_trace import POINTS, assert_same, sized

    from membench.trace import covered, evaluate, record_trace

    trace = record_trace(sized("tiny-llama", method, 4, 16, *extra))
    # Other ranks too (the symbol R): for 8-bit state only those whose A matrices still reach bitsandbytes'
    # 8-bit threshold and whose k/v B matrices do not, which the trace's validity says.
    ranks = {"train.optimizer=adamw_8bit": (34, 40, 62), "train.optimizer=sgd": (3, 6, 5),
             "method.lorafa_optimizer=true": (3, 6, 5)}.get(extra[0], (None,) * 3)
    if extra[0] == "train.optimizer=adamw_8bit":
        assert trace.validity["R"] == (32, 63)
    for (batch, seq), rank in zip(POINTS, ranks):
        run = sized("tiny-llama", method, batch, seq, *extra, *([f"method.rank={rank}"] if rank else []))
        assert covered(run) is None
        assert_same(evaluate(trace, run), measure(run))


def test_trace_keys_tell_optimizers_apart():
    from test_trace import sized

    from membench.trace import covered, trace_key

    settings = [(), ("train.optimizer=adamw_8bit",), ("train.optimizer=paged_adamw_8bit",), ("train.optimizer=sgd",),
                ("train.optimizer=sgd", "train.momentum=0.5"), ("train.optimizer=adafactor",)]
    keys = {trace_key(sized("tiny-llama", "lora", 2, 16, *setting)) for setting in settings}
    assert len(keys) == len(settings)
    assert all(covered(sized("tiny-llama", "lora", 2, 16, *setting)) is None for setting in settings)
