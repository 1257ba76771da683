"""Structured configuration: one dataclass per Hydra config group.

YAML files under ``conf/`` only pick and override these schemas. The CLI turns
the composed ``DictConfig`` into these objects once (``OmegaConf.to_object``),
so every ``__post_init__`` check runs before any model is built and nothing
downstream touches a ``DictConfig``.

Checks that need the model's structure (rank against layer widths, target
modules that match nothing) live in :mod:`membench.preflight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from membench.devices import CUSTOM, DEVICES, custom_device
from membench.errors import ConfigError

TASKS = ("sequence_classification", "seq2seq_lm", "causal_lm")
#: ``auto``: inferred from the config's ``architectures``/``model_type`` when the plan reads it.
MODEL_TASKS = (*TASKS, "auto")
METHODS = ("full", "lora", "lora_fa")
ADAPTER_DTYPES = ("fp32", "base")
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-autocast")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd")
#: Optimizers that come from bitsandbytes (membench.optim), and those with torch's foreach/fused/for_loop choice.
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
IMPLEMENTED_OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_IMPLS = ("foreach", "fused", "for_loop")
#: SGD's momentum when train.momentum is left unset: the value of "SGD with momentum" in torchvision's
#: reference training scripts (references/classification/train.py, --momentum 0.9) and in PyTorch's SGD docs'
#: example. transformers' Trainer (optim=sgd) leaves torch's 0, which keeps no state: set train.momentum=0.
DEFAULT_SGD_MOMENTUM = 0.9
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
#: Base-weight quantisation through bitsandbytes (membench.quantization): 4-bit NF4/FP4 (QLoRA) or LLM.int8().
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
#: bitsandbytes' 4-bit compute dtypes; ``null`` = the precision's (fp32, bf16 or fp16).
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
#: Storage dtype of the packed 4-bit weight (same bytes; a float type lets FSDP shard it).
QUANT_STORAGE_DTYPES = ("uint8", "bf16", "fp16", "fp32")
BACKENDS = ("auto", "cuda", "simulate", "cpu")
FAKE_DEVICES = ("auto", "cuda", "cpu")
TRACE_MODES = ("auto", "off")
#: The sizes a symbolic trace can leave symbolic: batch, sequence, target (decoder) length, LoRA rank.
TRACE_SYMBOLS = "BSTR"
PARALLEL_STRATEGIES = ("none", "ddp", "fsdp2")
#: Dtypes FSDP2's MixedPrecisionPolicy may cast parameters (param_dtype) or gradients (reduce_dtype) to.
PARALLEL_DTYPES = ("fp32", "bf16", "fp16")
MAX_WORLD_SIZE = 1024
#: Method keys that only mean something with adapters; MethodConfig rejects them for kind=full,
#: so sweeps and maxfit, which pair one command line with several methods, drop them there.
ADAPTER_ONLY_KEYS = ("method.rank", "method.alpha", "method.target_modules", "method.lora_dropout",
                     "method.target_parameters", "method.dora")


def check_choice(key: str, value: Any, choices: tuple) -> None:
    """Raise ConfigError naming ``key``, the bad ``value`` and the accepted ones."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not supported; choose one of: {', '.join(choices)}")


def check_positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer (1, 2, 3, ...)")


@dataclass
class ModelConfig:
    """A model built from a ``transformers`` config, with random weights.

    Attributes:
        name: Display name, used in result file names.
        model_type: ``transformers`` model type (``roberta``, ``t5``, ``llama``, ...).
        task: Which head to put on top: sequence_classification, seq2seq_lm or causal_lm.
        hf_config: Keyword arguments for the ``transformers`` config class.
        config_path: A local ``config.json`` (or a folder holding one). When set,
            it is loaded first and ``hf_config`` overrides it.
        attn_implementation: ``sdpa`` (fused kernels, no S x S probabilities saved)
            or ``eager`` (saves softmax probabilities and their dropout mask).
        target_modules: Default LoRA targets for this model, as PEFT module-name
            suffixes. ``null`` means the family default in :mod:`membench.models`.
        exclude_modules: Module-name suffixes never adapted (e.g. a classifier head).
        id: A Hugging Face Hub id (``Qwen/Qwen2.5-7B``) or a local folder holding a
            ``config.json``; only the config is read (``AutoConfig.from_pretrained``), never
            weights, so it works offline from the Hub cache. ``hf_config`` overrides it.
        revision: Hub revision (branch, tag or commit) of ``id``; ``null`` = the default branch.
        trust_remote_code: Run the config code a Hub repository ships (off unless set).
        quantization: ``none``, or the base weights through bitsandbytes as transformers'
            ``BitsAndBytesConfig`` loads them: ``nf4`` / ``fp4`` (4-bit, QLoRA) or ``int8``
            (LLM.int8()). Every linear layer is quantised except what transformers' loader leaves:
            the output head, tied and last modules, and the model's ``_keep_in_fp32_modules``.
        quantization_skip_modules: Module names left unquantised instead of transformers' defaults
            (``BitsAndBytesConfig(llm_int8_skip_modules=...)``, matched as transformers matches them;
            ``_keep_in_fp32_modules`` stay unquantised). ``null`` = the defaults. A classifier that
            PEFT trains in full (RoBERTa's ``classifier``) must be listed.
        double_quant: 4-bit only: quantise the absmax statistics too (``bnb_4bit_use_double_quant``).
        compute_dtype: 4-bit only: the dtype matmuls run in (``bnb_4bit_compute_dtype``);
            ``null`` = the precision's dtype (bf16 for bf16 and bf16-autocast, fp16, fp32).
        quant_storage: 4-bit only: the packed weight's storage dtype (``bnb_4bit_quant_storage``).
        prepare_kbit_training: Call PEFT's ``prepare_model_for_kbit_training`` on a quantised
            base: the other parameters are cast to fp32 and gradient checkpointing is turned on.
    """

    name: str = "custom"
    model_type: Optional[str] = None
    task: str = "causal_lm"
    hf_config: dict[str, Any] = field(default_factory=dict)
    config_path: Optional[str] = None
    attn_implementation: str = "sdpa"
    target_modules: Optional[list[str]] = None
    exclude_modules: Optional[list[str]] = None
    # Added after identity version 1: hashed only when set (membench.identity), so no result is renamed.
    id: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    quantization: str = "none"
    double_quant: bool = True  # QLoRA's recipe (Dettmers et al. 2023): NF4 + double quantisation
    compute_dtype: Optional[str] = None
    quant_storage: str = "uint8"
    prepare_kbit_training: bool = False
    quantization_skip_modules: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_choice("model.task", self.task, MODEL_TASKS)
        check_choice("model.quantization", self.quantization, QUANTIZATIONS)
        if self.compute_dtype is not None:
            check_choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("model.quant_storage", self.quant_storage, QUANT_STORAGE_DTYPES)
        if self.quantization == "none" and self.quantization_skip_modules is not None:
            raise ConfigError("model.quantization_skip_modules names what a quantised base leaves unquantised; "
                              f"set model.quantization ({', '.join(q for q in QUANTIZATIONS if q != 'none')}) or "
                              "drop it")
        if self.quantization == "none" and self.prepare_kbit_training:
            raise ConfigError("model.prepare_kbit_training=true prepares a quantised base; set model.quantization "
                              f"({', '.join(q for q in QUANTIZATIONS if q != 'none')}) or drop it")
        if self.quantization != "none":
            require_bitsandbytes(f"model.quantization={self.quantization}", "use model.quantization=none")
        if self.quantization == "int8" and (self.compute_dtype is not None or self.quant_storage != "uint8"):
            raise ConfigError("model.compute_dtype / model.quant_storage are 4-bit knobs; model.quantization=int8 "
                              "(LLM.int8()) has neither: drop them or use nf4 / fp4")
        if self.id is not None and self.config_path is not None:
            raise ConfigError(f"model.id={self.id!r} and model.config_path={self.config_path!r} both name a config; "
                              "give one of them")
        if self.id is not None and self.name == "hub":
            # The result file name starts with the model's name: the id's last part, no slashes.
            self.name = self.id.rstrip("/").rsplit("/", 1)[-1].lower() or "hub"
        if self.task == "auto" and self.id is None and self.config_path is None:
            raise ConfigError("model.task=auto reads the task from a config.json: it needs model.id or "
                              "model.config_path; otherwise name the task (causal_lm, seq2seq_lm, "
                              "sequence_classification)")
        check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class MethodConfig:
    """How the model is fine-tuned.

    Attributes:
        name: Label for reports (``lora_recompute`` is ``kind=lora`` plus recompute).
        kind: full (every weight trains), lora, or lora_fa (LoRA with A frozen:
            autograd then keeps no copy of each adapted layer's full-width input).
        gradient_checkpointing: Recompute each block's activations in backward.
            Cuts activation memory to roughly one block's worth, costs ~1 extra forward.
        rank: LoRA rank r (``null`` for full). Adapter bytes grow linearly with it.
        alpha: LoRA scaling numerator (scale = alpha / rank); ``null`` = 2 x rank.
        target_modules: Module-name suffixes to adapt (a list, or PEFT's ``all-linear``: every
            Linear/Conv1D inside the blocks); ``null`` uses the model's default.
        lora_dropout: Dropout on the adapter input. Above 0 it saves a mask and the
            dropped copy of X, which eats into LoRA-FA's saving.
        adapter_dtype: ``fp32`` (PEFT's default: adapters and their inputs upcast to
            fp32, one extra fp32 copy of X per adapted layer in plain LoRA) or ``base``.
        lorafa_optimizer: Use PEFT's ``create_lorafa_optimizer`` (AdamW with the
            LoRA-FA gradient correction for B). Costs time, not activations.
        target_parameters: Parameters (not modules) LoRA adapts through PEFT's ``target_parameters``:
            ``null`` = every fused MoE expert weight (``experts.gate_up_proj``, ``experts.down_proj``)
            when the model has them and the installed PEFT supports it; ``[]`` = none.
        dora: Weight-decomposed LoRA (PEFT's ``use_dora=True``): a trainable magnitude vector
            per adapted layer; forward also computes the weight's column norms and keeps more
            for backward (see the report's DoRA section).
    """

    name: str = "full"
    kind: str = "full"
    gradient_checkpointing: bool = False
    rank: Optional[int] = None
    alpha: Optional[int] = None
    target_modules: Optional[Any] = None  # a list of names, or one PEFT spelling (all-linear)
    lora_dropout: float = 0.0
    adapter_dtype: str = "fp32"
    lorafa_optimizer: bool = False
    dora: bool = False  # added after identity version 1: hashed only when set
    target_parameters: Optional[list[str]] = None  # likewise; null = a MoE model's fused expert weights

    def __post_init__(self) -> None:
        check_choice("method.kind", self.kind, METHODS)
        if self.kind == "full" and self.dora:
            raise ConfigError("method.dora=true decomposes LoRA adapters; method.kind=full has none: "
                              "pick method=dora (or method.kind=lora)")
        if self.target_parameters is not None:
            self.target_parameters = [self.target_parameters] if isinstance(self.target_parameters, str) \
                else list(self.target_parameters)
        if isinstance(self.target_modules, str):  # PEFT's spelling: one name or "all-linear"
            self.target_modules = [self.target_modules]
        elif self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        check_choice("method.adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if self.kind == "full":
            for key in ("rank", "alpha", "target_modules"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"method.{key}={getattr(self, key)!r} has no effect with method.kind=full "
                        "(no adapters); drop it or pick method=lora / lora_fa"
                    )
            if self.lora_dropout:
                raise ConfigError(f"method.lora_dropout={self.lora_dropout} has no effect with method.kind=full")
            if self.target_parameters:
                raise ConfigError(f"method.target_parameters={self.target_parameters} has no effect with "
                                  "method.kind=full (every weight trains)")
            return
        if self.rank is None:
            raise ConfigError(f"method.kind={self.kind} needs method.rank (a positive integer)")
        check_positive("method.rank", self.rank)
        if self.alpha is None:
            self.alpha = 2 * self.rank
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"method.lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ConfigError("method.target_modules=[] adapts nothing; give module names or null for the default")
        if self.lorafa_optimizer and self.kind != "lora_fa":
            raise ConfigError(
                f"method.lorafa_optimizer=true needs method.kind=lora_fa, got kind={self.kind!r}"
            )

    @property
    def uses_adapters(self) -> bool:
        return self.kind != "full"


@dataclass
class WorkloadConfig:
    """Synthetic batch and how many steps to run.

    Attributes:
        batch_size: Sequences per step. Activation bytes grow linearly with it.
        seq_len: Tokens per sequence (encoder length for T5).
        target_len: Decoder tokens for encoder-decoder models; ``null`` = seq_len.
        warmup_steps: Unmeasured steps first; the first one allocates optimizer state.
            0 measures the very first step, optimizer-state allocation included.
        measured_steps: Steps whose peak and median time are reported.
        seed: Seed for the synthetic token ids and the random weights.
    """

    batch_size: int = 32
    seq_len: int = 128
    target_len: Optional[int] = None
    warmup_steps: int = 2
    measured_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("workload.batch_size", self.batch_size)
        check_positive("workload.seq_len", self.seq_len)
        check_positive("workload.measured_steps", self.measured_steps)
        if self.target_len is not None:
            check_positive("workload.target_len", self.target_len)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"workload.warmup_steps={self.warmup_steps!r} must be an integer >= 0")


@dataclass
class TrainConfig:
    """Numerics and optimizer.

    Attributes:
        precision: fp32; bf16 or fp16 (weights stored in that dtype, half the
            weight bytes of fp32); bf16-autocast (fp32 weights, bf16 matmuls).
        optimizer: adamw (torch: two states shaped like each trainable weight, in its dtype);
            adamw_8bit (bitsandbytes: uint8 states plus an fp32 absmax per 256-element block;
            weights under 4096 elements keep fp32 states); paged_adamw_8bit (the same, with the
            states of weights of at least 1e5 elements in CUDA managed memory, outside the caching
            allocator: reported as paged_optimizer_state_bytes, not in allocated); adafactor
            (transformers, with Trainer's optim=adafactor settings: factored second moments, one
            row and one column vector per matrix, no first moment); sgd (torch, one momentum
            buffer per trainable weight).
        optimizer_impl: foreach (torch's CUDA default; full-model temporaries in
            the step), fused (no temporaries) or for_loop (one tensor at a time). For adamw
            and sgd; the other optimizers have one implementation.
        lr: Learning rate; irrelevant to memory, kept for realism.
        momentum: SGD's momentum; ``null`` = 0.9 with sgd (0 keeps no state). sgd only.
    """

    precision: str = "fp32"
    optimizer: str = "adamw"
    optimizer_impl: str = "foreach"
    lr: float = 1e-4
    momentum: Optional[float] = None  # added after identity version 1: hashed only when set (sgd runs)

    def __post_init__(self) -> None:
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        default_impl = TrainConfig.optimizer_impl
        if self.optimizer not in IMPLEMENTED_OPTIMIZERS and self.optimizer_impl != default_impl:
            raise ConfigError(
                f"train.optimizer_impl={self.optimizer_impl} chooses torch's AdamW/SGD kernels; "
                f"train.optimizer={self.optimizer} has one implementation: drop it (train.optimizer_impl applies "
                f"to {', '.join(IMPLEMENTED_OPTIMIZERS)})"
            )
        if self.optimizer == "sgd":
            if self.momentum is None:
                self.momentum = DEFAULT_SGD_MOMENTUM
            if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) \
                    or not 0.0 <= self.momentum < 1.0:
                raise ConfigError(f"train.momentum={self.momentum!r} must be a number in [0, 1)")
        elif self.momentum is not None:
            raise ConfigError(f"train.momentum={self.momentum!r} applies to train.optimizer=sgd only, "
                              f"not {self.optimizer}: drop it")
        if self.optimizer in BITSANDBYTES_OPTIMIZERS:
            require_bitsandbytes(f"train.optimizer={self.optimizer}", "choose train.optimizer=adamw, adafactor or sgd")


def require_bitsandbytes(what: str, instead: str) -> None:
    """Raise ConfigError naming ``what`` and ``instead`` unless bitsandbytes imports (its import costs about
    2 s, once per process)."""
    import importlib

    try:
        importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ConfigError(f"{what} needs bitsandbytes, which cannot be imported here ({error}); install it "
                          f"(pip install bitsandbytes) or {instead}") from None


@dataclass
class BackendConfig:
    """Where the step runs.

    Attributes:
        name: auto (cuda if a GPU is visible, else simulate), cuda (the real
            allocator), simulate (fake tensors + allocator model, no real memory),
            or cpu (real execution on CPU with the same allocator model).
        device: For ``simulate``: the GPU profile to predict for (see
            :mod:`membench.devices`; ``membench-devices`` lists them), or ``custom``.
        device_memory_gib: ``device=custom`` only (required there): the card's capacity in GiB,
            as ``torch.cuda.get_device_properties().total_memory`` reports it.
        compute_capability: ``device=custom`` only: ``major.minor`` (e.g. 9.0); sets the cuBLAS
            workspaces. ``null`` = 8.0 (pre-Hopper, like the generic sizes).
        cuda_semantics: On CPU tensors, save what CUDA kernels save (bool dropout
            masks, fused attention). Off shows raw CPU behaviour instead.
        fake_device: For ``simulate``: fake ``cuda`` tensors (CUDA's own code
            paths; needs a CUDA build of torch), fake ``cpu`` tensors with
            ``cuda_semantics``, or ``auto`` (cuda when a GPU is visible).
        memory_snapshot: Record the caching allocator's history during the run (``cuda``:
            the real allocator's; ``simulate``/``cpu``: the allocator model's) and write it, to
            ``<results_dir>/<run_id>.snapshot.pickle`` (the path goes into the
            result's ``env.memory_snapshot``). Open it at
            https://pytorch.org/memory_viz to see every allocation over time
            with its Python stack. A snapshot run gets its own run id; the ids
            of other runs do not change.
        trace: For ``simulate``: ``auto`` answers a run from a cached symbolic
            trace of its (model, method, precision, ...) where the trace covers
            it (byte-identical to direct simulation, ms instead of seconds) and
            simulates directly otherwise; ``off`` always simulates directly. How
            a result is computed, not what: never recorded, never in the run id.
        trace_symbols: The sizes a trace recorded for this run leaves symbolic, letters of
            ``BSTR`` (batch size, sequence length, target length, LoRA rank); the others stay
            this run's, and the trace answers only runs with the same values of them. All four
            by default; a sweep sets the ones its jobs vary (fewer symbols record faster). Like
            ``trace``, never recorded, never in the run id.
        alloc_conf: CUDA caching-allocator settings in ``PYTORCH_CUDA_ALLOC_CONF`` syntax
            (``expandable_segments:True``, ``max_split_size_mb:128``, ...). ``simulate``/``cpu``
            replay the run through the allocator model with them (:mod:`membench.reserved`);
            ``cuda`` sets the environment variable before CUDA initialises. Empty: PyTorch's defaults.
    """

    name: str = "auto"
    device: str = "h100-80gb"
    cuda_semantics: bool = True
    fake_device: str = "auto"
    memory_snapshot: bool = False
    trace: str = "auto"
    trace_symbols: str = TRACE_SYMBOLS
    alloc_conf: str = ""  # added after identity version 1: hashed only when set
    device_memory_gib: Optional[float] = None  # added after identity version 1: hashed only when set
    compute_capability: Optional[str] = None  # likewise

    def __post_init__(self) -> None:
        check_choice("backend.name", self.name, BACKENDS)
        check_choice("backend.trace", self.trace, TRACE_MODES)
        symbols = str(self.trace_symbols)
        if not symbols or set(symbols) - set(TRACE_SYMBOLS) or len(set(symbols)) != len(symbols):
            raise ConfigError(f"backend.trace_symbols={self.trace_symbols!r} is not supported; give each of "
                              f"{', '.join(TRACE_SYMBOLS)} at most once (e.g. {TRACE_SYMBOLS}, or B for the batch size only)")
        check_choice("backend.fake_device", self.fake_device, FAKE_DEVICES)
        check_choice("backend.device", self.device, (*DEVICES, CUSTOM))
        if self.device == CUSTOM:
            custom_device(self.device_memory_gib, self.compute_capability)  # capacity given, capability well-formed
        elif self.device_memory_gib is not None or self.compute_capability is not None:
            raise ConfigError(
                f"backend.device_memory_gib / backend.compute_capability describe a custom card; with "
                f"backend.device={self.device} they would be ignored: drop them or set backend.device=custom"
            )
        from membench.caching_allocator.settings import AllocatorSettings

        # Bad keys and values, and backend:cudaMallocAsync (not modelled), fail here, before any model is built.
        AllocatorSettings.parse(self.alloc_conf or None)


@dataclass
class ParallelConfig:
    """Data parallelism over several GPUs; every figure is then per GPU (rank 0, the largest shard).

    Attributes:
        strategy: ``none`` (one GPU), ``ddp`` (DistributedDataParallel: every rank holds the whole
            model plus gradient buckets) or ``fsdp2`` (``torch.distributed.fsdp.fully_shard``:
            parameters, gradients and optimizer state sharded 1/world_size, gathered per block).
        world_size: Number of ranks (GPUs), 1 to 1024; several nodes are just more ranks.
        reshard_after_forward: FSDP2: free each block's gathered parameters after forward (true,
            gather again in backward), keep them (false: more memory, less communication), or an
            int that divides world_size (reshard to groups of that size).
        param_dtype: FSDP2 mixed precision: the dtype parameters are gathered and computed in
            (``null``: the stored dtype). Sharded parameters stay in the stored dtype.
        reduce_dtype: FSDP2 mixed precision: the dtype gradients are reduced in (``null``: param_dtype).
        cpu_offload: FSDP2's ``CPUOffloadPolicy``: sharded parameters, gradients and optimizer state
            live in host memory, reported apart from device bytes.
        wrap_embeddings: FSDP2: shard the input embeddings and the output head as groups of their
            own, so they are gathered only while used (else they belong to the root group, which
            stays gathered through forward and backward).
        bucket_cap_mb: DDP: gradient bucket size in MiB (DistributedDataParallel's bucket_cap_mb);
            ``null`` = DDP's default (a 1 MiB first bucket, then 25 MiB ones).
    """

    strategy: str = "none"
    world_size: int = 1
    reshard_after_forward: Any = True
    param_dtype: Optional[str] = None
    reduce_dtype: Optional[str] = None
    cpu_offload: bool = False
    wrap_embeddings: bool = False
    bucket_cap_mb: Optional[float] = None

    def __post_init__(self) -> None:
        check_choice("parallel.strategy", self.strategy, PARALLEL_STRATEGIES)
        if (not isinstance(self.world_size, int) or isinstance(self.world_size, bool)
                or not 1 <= self.world_size <= MAX_WORLD_SIZE):
            raise ConfigError(f"parallel.world_size={self.world_size!r} must be an integer from 1 to {MAX_WORLD_SIZE}")
        if self.strategy == "none" and self.world_size > 1:
            raise ConfigError(f"parallel.world_size={self.world_size} needs a parallel strategy: set "
                              "parallel.strategy=fsdp2 or ddp (parallel.strategy=none is one GPU)")
        reshard = self.reshard_after_forward
        if not isinstance(reshard, bool):
            if not isinstance(reshard, int) or reshard < 1 or self.world_size % reshard:
                raise ConfigError(f"parallel.reshard_after_forward={reshard!r} must be true, false or an integer "
                                  f"that divides parallel.world_size={self.world_size}")
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self, key) is not None:
                check_choice(f"parallel.{key}", getattr(self, key), PARALLEL_DTYPES)
        if self.strategy != "fsdp2":
            for key in ("reshard_after_forward", "param_dtype", "reduce_dtype", "cpu_offload", "wrap_embeddings"):
                if getattr(self, key) != getattr(ParallelConfig, key):
                    raise ConfigError(f"parallel.{key}={getattr(self, key)!r} is an FSDP2 option; it has no effect "
                                      f"with parallel.strategy={self.strategy}: drop it or set parallel.strategy=fsdp2")
        cap = self.bucket_cap_mb
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or cap <= 0):
            raise ConfigError(f"parallel.bucket_cap_mb={cap!r} must be a positive number of MiB (or null)")
        if self.strategy != "ddp" and cap is not None:
            raise ConfigError(f"parallel.bucket_cap_mb={self.bucket_cap_mb!r} is a DDP option; it has no effect with "
                              f"parallel.strategy={self.strategy}")

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"


#: Weight storage dtype (train.precision) -> the FSDP2 param_dtype values that do not contradict it:
#: a gathered copy may be narrower than fp32 master weights, never wider than, or a different 16-bit
#: format from, weights already stored in 16 bits.
COMPATIBLE_PARAM_DTYPES = {"fp32": PARALLEL_DTYPES, "bf16-autocast": PARALLEL_DTYPES, "bf16": ("bf16",),
                           "fp16": ("fp16",)}


@dataclass
class RunConfig:
    """One measured configuration: model x method x workload x numerics x backend.

    Attributes:
        results_dir: Where result files go (not part of the run's identity).
        force: Re-measure even if ``results_dir`` already holds an ok or oom
            result for this exact configuration (not part of its identity).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Added after identity version 1: hashed only where it differs from one GPU (membench.identity).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    results_dir: str = "results/runs"
    force: bool = False

    def __post_init__(self) -> None:
        if self.model.task not in ("seq2seq_lm", "auto") and self.workload.target_len is not None:
            raise ConfigError(
                f"workload.target_len={self.workload.target_len} only applies to seq2seq models; "
                f"model {self.model.name!r} is {self.model.task}"
            )
        if self.model.quantization != "none" and not self.method.uses_adapters:
            raise ConfigError(
                f"model.quantization={self.model.quantization} freezes the base weights in bitsandbytes' "
                f"quantised layers, which cannot train; method.kind=full needs model.quantization=none "
                "(or pick method=qlora / qlora_fa / qdora)"
            )
        if self.model.quantization in ("nf4", "fp4"):
            from membench.quantization import check_compute_dtype

            check_compute_dtype(self.model, self.train.precision)
        if self.method.lorafa_optimizer and self.train.optimizer != "adamw":
            raise ConfigError(
                f"method.lorafa_optimizer=true is PEFT's own AdamW (create_lorafa_optimizer); "
                f"train.optimizer={self.train.optimizer} would be ignored: drop one of them"
            )
        if self.method.lorafa_optimizer and self.train.optimizer_impl == "fused":
            raise ConfigError(
                "method.lorafa_optimizer=true uses PEFT's own AdamW, which has no fused kernel; "
                "drop train.optimizer_impl=fused"
            )
        param_dtype = self.parallel.param_dtype
        if param_dtype is not None and param_dtype not in COMPATIBLE_PARAM_DTYPES[self.train.precision]:
            raise ConfigError(
                f"parallel.param_dtype={param_dtype} contradicts train.precision={self.train.precision} (weights "
                f"stored in {self.train.precision}): use parallel.param_dtype="
                f"{' or '.join(COMPATIBLE_PARAM_DTYPES[self.train.precision])} or null, or train.precision=fp32 "
                "with FSDP2 mixed precision")


def register_configs() -> None:
    """Register the schema; conf/config.yaml lists it first, so every group's YAML is typed by it."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
