"""What the GPU check kit runs: configurations measured on ``cuda`` and predicted by ``simulate``.

Each :class:`Check` is one configuration (Hydra overrides of the real ``conf/`` tree). The kit runs it
in three fresh processes: ``cuda`` (the measurement), ``simulate`` on fake CPU tensors and ``simulate``
on fake CUDA tensors (where torch has CUDA). What a check covers is read off its composed config
(:func:`coverage`), never typed in, and :func:`missing_coverage` names any method, precision,
attention implementation or model family that no check exercises.

Extension point: append a :class:`Check` to :data:`CHECKS` (a configuration to compare), or register a
function with :func:`probe` (anything else a GPU should answer: a two-GPU FSDP2 run, a quantised
model, the reserved-memory model). See the package docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from membench.config import ATTN_IMPLEMENTATIONS, PRECISIONS

CONF = Path(__file__).resolve().parent.parent / "conf"

# Estimated wall seconds of one ``cuda`` run on one H100/H200, not yet measured (summary.json records
# each run's real wall time; replace these with those). A fresh process imports torch, transformers,
# PEFT and Hydra and creates a CUDA context (~15 s); a model under ~1B parameters then builds and runs
# three steps in a few seconds. A 7B model also initialises 6.7e9 random weights on the GPU and runs
# three steps of ~2e14 FLOPs each (~1 s each at a few hundred TFLOP/s): about 45 s in all.
SMALL_RUN_S = 20
LARGE_RUN_S = 45
SNAPSHOT_RUN_S = 25  # a small model plus recording every allocation's Python stack

REFERENCE_LLAMA = ("model=llama-7b", "method.rank=64", "method.adapter_dtype=base", "train.precision=bf16",
                   "workload.batch_size=16", "workload.seq_len=512")
# Allocator settings go into a check's overrides, so cuda (PYTORCH_CUDA_ALLOC_CONF before CUDA starts)
# and simulate (membench.reserved's model) run with the same ones.
EXPANDABLE = "backend.alloc_conf=expandable_segments:True"
ROBERTA_REFERENCE = ("model=roberta-large", "method.rank=8", "workload.batch_size=32", "workload.seq_len=128",
                     "model.attn_implementation=eager")


def four_layers(model: str) -> tuple[str, ...]:
    """A 7B-class shape with 4 of its blocks: the family's real layers and embeddings at ~2B parameters."""
    return (f"model={model}", "model.hf_config.num_hidden_layers=4", f"model.name={model}-4l")


@dataclass(frozen=True)
class Check:
    """One configuration the kit runs on ``cuda`` and on ``simulate``.

    Attributes:
        name: Short label, unique; also the summary key.
        overrides: Hydra overrides (``model=``, ``method=`` and any ``key=value``); the only backend key
            they may carry is ``backend.alloc_conf`` (the kit adds the rest per backend).
        why: What this check adds that the others do not (the coverage itself is computed).
        estimated_s: Estimated wall seconds of its ``cuda`` run (the budget guard's unit).
        reference_case: The ``case`` of its row in ``membench/data/h100_reference.csv``, if any.
        snapshot: Also run it once more on ``cuda`` with ``backend.memory_snapshot=true``.
        quick: Part of ``--quick`` (one check per family, cheapest first).
    """

    name: str
    overrides: tuple[str, ...]
    why: str
    estimated_s: int = SMALL_RUN_S
    reference_case: Optional[str] = None
    snapshot: bool = False
    quick: bool = False


#: The configurations, in the order they run (the budget guard skips from the end).
CHECKS: list[Check] = [
    Check("roberta-large-lora_fa", ("method=lora_fa", *ROBERTA_REFERENCE),
          "H100 reference row; eager attention's saved probabilities and dropout masks",
          reference_case="roberta-large/lora_fa", quick=True),
    Check("llama-7b-lora_fa-bf16", ("method=lora_fa", *REFERENCE_LLAMA),
          "H100 reference row at 7B scale: the paper's headline LoRA-FA configuration",
          estimated_s=LARGE_RUN_S, reference_case="llama-7b/lora_fa-bf16-adapters", quick=True),
    Check("roberta-large-full", ("method=full", "model=roberta-large", "workload.batch_size=32",
                                 "workload.seq_len=128", "model.attn_implementation=eager"),
          "H100 reference row; full fine-tuning, whose peak can fall in foreach AdamW's step",
          reference_case="roberta-large/full"),
    Check("roberta-large-lora_recompute", ("method=lora_recompute", *ROBERTA_REFERENCE),
          "H100 reference row; recompute's per-block checkpoints", reference_case="roberta-large/lora_recompute"),
    Check("t5-large-lora_fa_recompute", ("model=t5-large", "method=lora_fa_recompute", "method.rank=8",
                                         "workload.batch_size=8", "workload.seq_len=256"),
          "encoder-decoder with relative-position bias through SDPA (which kernel CUDA picks)"),
    Check("t5-base-lora-bf16-autocast-eager", ("model=t5-base", "method=lora", "method.rank=8",
                                               "train.precision=bf16-autocast", "workload.batch_size=8",
                                               "workload.seq_len=256", "model.attn_implementation=eager"),
          "autocast: fp32 weights with bf16 copies made per matmul", quick=True),
    Check("roberta-base-full_recompute-fp16", ("model=roberta-base", "method=full_recompute", "train.precision=fp16",
                                               "workload.batch_size=16", "workload.seq_len=256"),
          "fp16 weights; recompute with full fine-tuning"),
    Check("qwen2.5-7b-4l-lora-bf16", (*four_layers("qwen2.5-7b"), "method=lora", "method.rank=16",
                                      "method.adapter_dtype=base", "train.precision=bf16",
                                      "workload.batch_size=4", "workload.seq_len=1024"),
          "Qwen2: GQA with 4 KV heads, biased q/k/v, a 152k vocabulary (large logits)", quick=True),
    Check("mistral-7b-4l-lora_fa-bf16-eager", (*four_layers("mistral-7b"), "method=lora_fa", "method.rank=16",
                                               "train.precision=bf16", "workload.batch_size=4",
                                               "workload.seq_len=1024", "model.attn_implementation=eager"),
          "Mistral: GQA with 8 KV heads; eager attention keeps S x S probabilities in bf16; fp32 adapters",
          quick=True),
    Check("llama-3-8b-4l-full-bf16", (*four_layers("llama-3-8b"), "method=full", "train.precision=bf16",
                                      "workload.batch_size=4", "workload.seq_len=512"),
          "full fine-tuning of a decoder in bf16: AdamW states in bf16, a 128k vocabulary"),
    Check("roberta-base-lora_fa-snapshot", ("model=roberta-base", "method=lora_fa", "method.rank=8",
                                            "workload.batch_size=8", "workload.seq_len=128"),
          "small enough that its allocator snapshot can be committed", snapshot=True),
    Check("llama-7b-lora_fa-bf16-expandable", ("method=lora_fa", *REFERENCE_LLAMA, EXPANDABLE),
          "check llama-7b-lora_fa-bf16 with expandable segments on both sides: measured and predicted "
          "reserved memory with and without them", estimated_s=LARGE_RUN_S),
    Check("llama-7b-lora-bf16", ("method=lora", *REFERENCE_LLAMA),
          "H100 reference row: plain LoRA beside check llama-7b-lora_fa-bf16 (the LoRA/LoRA-FA ratio)",
          estimated_s=LARGE_RUN_S, reference_case="llama-7b/lora-bf16-adapters"),
]


#: One check per model family of the catalogue beyond the paper's and the current decoders
#: (``--catalogue``). They would push the default run past 8 minutes, so they run on request; the
#: decoders keep a few blocks of their real shape (real embeddings and head), bf16, as people run them.
CATALOGUE_CHECKS: list[Check] = [
    Check("gpt2-lora", ("model=gpt2", "method=lora", "method.rank=8", "workload.batch_size=8",
                        "workload.seq_len=512"), "GPT-2's Conv1D projections (weights stored transposed)"),
    Check("bert-base-lora_fa", ("model=bert-base", "method=lora_fa", "method.rank=8", "workload.batch_size=32",
                                "workload.seq_len=128"), "BERT encoder: sequence classification, absolute positions"),
    Check("deberta-v3-base-lora", ("model=deberta-v3-base", "method=lora", "method.rank=8",
                                   "workload.batch_size=16", "workload.seq_len=128"),
          "DeBERTa-v2 disentangled attention (eager only; simulate cannot run its aten.nonzero on fake tensors)"),
    *(Check(f"{model}-{layers}l-{method}-bf16",
            (f"model={model}", f"model.hf_config.num_hidden_layers={layers}", f"model.name={model}-{layers}l",
             f"method={method}", "method.rank=16", "train.precision=bf16", "workload.batch_size=2",
             "workload.seq_len=1024"), why)
      for model, layers, method, why in (
          ("gemma-2-9b", 2, "lora", "Gemma 2: eager attention (sdpa refused), soft-capping, a 256k vocabulary"),
          ("gemma-3-12b", 2, "lora_fa", "Gemma 3 text model: sliding and global layers"),
          ("phi-3.5-mini", 4, "lora", "Phi-3: fused qkv and gate_up projections"),
          ("qwen3-8b", 4, "lora_fa", "Qwen3: q/k norms"),
          ("qwen3-30b-a3b", 2, "lora", "Qwen3 MoE: fused expert weights (not adapted), grouped GEMM"),
          ("mixtral-8x7b", 2, "lora_fa", "Mixtral MoE: eight experts per layer"),
      )),
]


#: QLoRA, QDoRA and DoRA (``--quantized``): bitsandbytes' 4-bit layers and PEFT's DoRA, whose CUDA kernels
#: (the 4-bit matmul's dequantise-then-linear fallback above 1536 rows, the packed weight's statistics)
#: simulate models from bitsandbytes' source, unmeasured. Llama 3.1 8B with 4 of its blocks, bf16 compute,
#: 4 x 1024 = 4096 rows per matmul; each method once, so a run's difference names the method.
QUANTIZED_CHECKS: list[Check] = [
    Check(f"llama-3.1-8b-4l-{method}-bf16", (*four_layers("llama-3.1-8b"), f"method={method}", "method.rank=16",
                                            "train.precision=bf16", "workload.batch_size=4", "workload.seq_len=1024"),
          why)
    for method, why in (
        ("qlora", "NF4 base with double quantisation: packed weights, absmax and code tables; the 4-bit matmul"),
        ("qlora_fa", "LoRA-FA on the NF4 base: the saving QLoRA users would get"),
        ("qlora_recompute", "QLoRA with recompute: the 4-bit matmul and its dequantisation again in backward"),
        ("qlora_fa_recompute", "LoRA-FA on the NF4 base with recompute"),
        ("dora", "DoRA on the bf16 base: the weight norm and the two kept outputs per layer"),
        ("dora_recompute", "DoRA with recompute"),
        ("qdora", "DoRA on the NF4 base: PEFT dequantises every weight for its norm in forward"),
        ("qdora_recompute", "QDoRA with recompute"),
    )
]


@dataclass
class ProbeContext:
    """What a probe function gets.

    Attributes:
        out: The device folder (``results/gpu/<device-key>/``); write files under it.
        python: The interpreter to start subprocesses with (GPU work belongs in a fresh process).
        remaining_s: Seconds left in the kit's budget when the probe starts; stay under it.
        run: ``run(argv, timeout_s)`` -> (exit status, combined output): a subprocess with a timeout.
    """

    out: Path
    python: str
    remaining_s: float
    run: Callable[[list[str], float], tuple[int, str]]


@dataclass(frozen=True)
class Probe:
    """A GPU check that is not a cuda-vs-simulate configuration: a function whose dict goes into summary.json."""

    name: str
    why: str
    estimated_s: int
    function: Callable[[ProbeContext], dict[str, Any]] = field(compare=False)
    gpus: int = 1  # skipped, with the reason recorded, when fewer GPUs are visible


#: Registered probes, run after the configuration checks in registration order.
PROBES: list[Probe] = []


def probe(name: str, why: str, estimated_s: int, gpus: int = 1):
    """Decorator: register ``function(context) -> dict`` as a probe of the kit."""
    def register(function: Callable[[ProbeContext], dict[str, Any]]):
        if any(existing.name == name for existing in PROBES):
            raise ValueError(f"a gpucheck probe named {name!r} is already registered")
        PROBES.append(Probe(name, why, estimated_s, function, gpus))
        return function
    return register


def gpu_seconds(check: Check) -> int:
    """Estimated GPU-lane seconds of a check: its cuda run, plus the snapshot run if it has one."""
    return check.estimated_s + SNAPSHOT_RUN_S * check.snapshot


def selected(quick: bool = False, catalogue: bool = False, quantized: bool = False) -> list[Check]:
    """The checks a run makes: all of :data:`CHECKS` (or the ``quick`` ones), plus :data:`CATALOGUE_CHECKS`
    and :data:`QUANTIZED_CHECKS` on request."""
    return ([check for check in CHECKS if check.quick or not quick] + (CATALOGUE_CHECKS if catalogue else [])
            + (QUANTIZED_CHECKS if quantized else []))


@lru_cache(maxsize=None)
def run_configs(check: Check, *backend: str):
    """The check's RunConfig with ``backend`` overrides, composed from the real conf/ tree."""
    from hydra import compose, initialize_config_dir

    from membench.cli import to_run_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=[*check.overrides, *backend]))


def coverage(checks: list[Check]) -> dict[str, set[str]]:
    """Methods, precisions, attention implementations and model families the checks exercise."""
    covered: dict[str, set[str]] = {"method": set(), "precision": set(), "attention": set(), "family": set()}
    for check in checks:
        run = run_configs(check, "backend.name=simulate")
        covered["method"].add(run.method.name)
        covered["precision"].add(run.train.precision)
        covered["attention"].add(run.model.attn_implementation)
        covered["family"].add(run.model.model_type)
    return covered


def required_coverage() -> dict[str, set[str]]:
    """Everything membench offers: conf/method/*.yaml, PRECISIONS, ATTN_IMPLEMENTATIONS, conf/model families."""
    from omegaconf import OmegaConf

    families = {OmegaConf.load(path).get("model_type") for path in (CONF / "model").glob("*.yaml")}
    def method_name(path: Path) -> str:
        loaded = OmegaConf.load(path)  # qlora & co. are placed at the top level (they set model.quantization too)
        return loaded["method"]["name"] if "method" in loaded else loaded["name"]

    return {"method": {method_name(path) for path in (CONF / "method").glob("*.yaml")},
            "precision": set(PRECISIONS), "attention": set(ATTN_IMPLEMENTATIONS),
            "family": {family for family in families if family}}


def missing_coverage(checks: list[Check]) -> dict[str, set[str]]:
    covered = coverage(checks)
    return {axis: wanted - covered[axis] for axis, wanted in required_coverage().items() if wanted - covered[axis]}
