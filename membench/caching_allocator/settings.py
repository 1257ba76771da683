"""``PYTORCH_CUDA_ALLOC_CONF`` as the caching-allocator model reads it.

Grammar and checks follow PyTorch's own parser (``c10/core/AllocatorConfig.cpp``:
``AllocatorConfig::lexArgs`` / ``parseArgs`` and the ``parse*`` helpers it calls, with the
CUDA-only keys of ``c10/cuda/CUDAAllocatorConfig.cpp``: ``CUDAAllocatorConfig::parseArgs``).
Where PyTorch would throw, this raises ``ConfigError`` instead, naming the supported keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from membench.errors import ConfigError

MIB = 1024 * 1024
# kLargeBuffer (CUDACachingAllocator.cpp / CachingDeviceAllocator.h): 20 MiB. It is also the
# smallest max_split_size_mb / max_non_split_rounding_mb PyTorch accepts
# (AllocatorConfig::parseMaxSplitSize: "must be >= kLargeBuffer / kMB").
LARGE_BUFFER = 20 * MIB
# kRoundUpPowerOfTwoIntervals (AllocatorConfig.cpp): one divisions entry per power of two
# from 1 MiB (kRoundUpPowerOfTwoStart) to 64 GiB (kRoundUpPowerOfTwoEnd).
ROUNDUP_INTERVALS = 16
ROUNDUP_FIRST_LOG2 = 20  # log2(kRoundUpPowerOfTwoStart = 1 MiB)

# Keys that change what the device allocator reserves: modelled.
MODELLED_KEYS = (
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "roundup_power2_divisions",
    "expandable_segments",
    "garbage_collection_threshold",
    "backend",
)
# Keys PyTorch accepts that cannot change device reservations in a replay of one process
# without CUDA graphs: pinned host memory, lock handling around cudaMalloc, and record_stream
# reuse during graph capture. Accepted (so a real config parses) and ignored.
IGNORED_KEYS = (
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_num_register_threads",
    "pinned_use_background_threads",
    "pinned_reserve_segment_size_mb",
    "graph_capture_record_stream_reuse",
)
SUPPORTED_KEYS = MODELLED_KEYS + IGNORED_KEYS
_BOOL_KEYS = {
    "expandable_segments",
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_use_background_threads",
    "graph_capture_record_stream_reuse",
}


def _fail(alloc_conf: str, why: str) -> ConfigError:
    return ConfigError(
        f"alloc_conf {alloc_conf!r}: {why}. Supported keys: {', '.join(SUPPORTED_KEYS)} "
        "(syntax: key:value,key:value as in PYTORCH_CUDA_ALLOC_CONF)"
    )


def _lex(alloc_conf: str) -> list[str]:
    """AllocatorConfig::lexArgs: ',', ':', '[' and ']' are tokens of their own; spaces vanish."""
    tokens: list[str] = []
    buf: list[str] = []
    for ch in alloc_conf:
        if ch in ",:[]":
            if buf:
                tokens.append("".join(buf))
                buf = []
            tokens.append(ch)
        elif ch != " ":
            buf.append(ch)
    if buf:
        tokens.append("".join(buf))
    return tokens


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class AllocatorSettings:
    """The allocator knobs that decide reserved memory. Defaults are PyTorch's
    (``AllocatorConfig::AllocatorConfig``): nothing limited, no power-of-two rounding."""

    max_split_size: int | None = None  # bytes; None = SIZE_MAX (unlimited), the default
    max_non_split_rounding_size: int = LARGE_BUFFER  # default kLargeBuffer
    expandable_segments: bool = False
    # divisions per power-of-two interval [2^(20+i), 2^(21+i)); 0 or 1 = plain 512 B rounding
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    # Accepted but inert, as in PyTorch when no per-process memory fraction is set:
    # DeviceCachingAllocator::malloc runs garbage_collect_cached_blocks only when
    # ``set_fraction`` is true (torch.cuda.set_per_process_memory_fraction), which this model
    # does not replay. A model with a memory fraction must also model the GC.
    garbage_collection_threshold: float = 0.0
    alloc_conf: str = ""

    @classmethod
    def parse(cls, alloc_conf: str | None) -> "AllocatorSettings":
        """Parse ``PYTORCH_CUDA_ALLOC_CONF`` text, e.g. ``"expandable_segments:True,max_split_size_mb:128"``."""
        if alloc_conf is None or not alloc_conf.strip():
            return cls()
        tokens = _lex(alloc_conf)
        values: dict[str, object] = {}
        i = 0

        def value_token(key: str) -> str:
            # consumeToken(config, ++i, ':') then the value token
            nonlocal i
            if i + 1 >= len(tokens) or tokens[i + 1] != ":":
                raise _fail(alloc_conf, f"expected ':' after {key!r}")
            if i + 2 >= len(tokens):
                raise _fail(alloc_conf, f"missing value for {key!r}")
            i += 2
            if tokens[i] in ",:[]":
                raise _fail(alloc_conf, f"missing value for {key!r}")
            return tokens[i]

        def as_int(key: str, text: str) -> int:
            if not text.isdigit():
                raise _fail(alloc_conf, f"{key} wants a non-negative integer, got {text!r}")
            return int(text)

        while i < len(tokens):
            key = tokens[i]
            if key in values:
                raise _fail(alloc_conf, f"{key!r} given twice")
            if key in _BOOL_KEYS:
                text = value_token(key)
                if text not in ("True", "False"):  # PyTorch accepts exactly these two spellings
                    raise _fail(alloc_conf, f"expected a single True/False argument for {key}, got {text!r}")
                values[key] = text == "True"
            elif key in ("max_split_size_mb", "max_non_split_rounding_mb"):
                mb = as_int(key, value_token(key))
                if mb < LARGE_BUFFER // MIB:  # AllocatorConfig::parseMaxSplitSize / parseMaxNonSplitRoundingSize
                    raise _fail(alloc_conf, f"{key} too small, must be >= {LARGE_BUFFER // MIB}")
                values[key] = mb * MIB
            elif key == "garbage_collection_threshold":
                text = value_token(key)
                try:
                    threshold = float(text)
                except ValueError:
                    raise _fail(alloc_conf, f"{key} wants a number, got {text!r}") from None
                if not 0.0 < threshold < 1.0:  # AllocatorConfig::parseGarbageCollectionThreshold
                    raise _fail(alloc_conf, f"{key} must be in (0.0, 1.0), got {text!r}")
                values[key] = threshold
            elif key == "roundup_power2_divisions":
                values[key], i = _parse_roundup(alloc_conf, tokens, i)
            elif key == "backend":
                text = value_token(key)
                if text == "cudaMallocAsync":
                    raise _fail(
                        alloc_conf,
                        "backend:cudaMallocAsync is not modelled (CUDA's own stream-ordered pool "
                        "decides reserved memory there, not the caching allocator); use backend:native",
                    )
                if text != "native":
                    raise _fail(alloc_conf, f"unknown allocator backend {text!r}; options are native and cudaMallocAsync")
                values[key] = text
            elif key in ("pinned_num_register_threads", "pinned_reserve_segment_size_mb"):
                values[key] = as_int(key, value_token(key))
            elif key in ",:[]":
                raise _fail(alloc_conf, f"unexpected {key!r}")
            else:
                raise _fail(alloc_conf, f"unrecognized key {key!r}")
            i += 1
            if i < len(tokens):
                if tokens[i] != ",":
                    raise _fail(alloc_conf, f"expected ',' after the value of {key!r}, got {tokens[i]!r}")
                i += 1
                if i == len(tokens):
                    raise _fail(alloc_conf, "trailing ','")

        return cls(
            max_split_size=values.get("max_split_size_mb"),  # type: ignore[arg-type]
            max_non_split_rounding_size=values.get("max_non_split_rounding_mb", LARGE_BUFFER),  # type: ignore[arg-type]
            expandable_segments=bool(values.get("expandable_segments", False)),
            roundup_power2_divisions=values.get("roundup_power2_divisions", (0,) * ROUNDUP_INTERVALS),  # type: ignore[arg-type]
            garbage_collection_threshold=values.get("garbage_collection_threshold", 0.0),  # type: ignore[arg-type]
            alloc_conf=alloc_conf,
        )

    def divisions_for(self, size: int) -> int:
        """AllocatorConfig::roundup_power2_divisions(size): the entry of size's power-of-two interval."""
        index = size.bit_length() - 1 - ROUNDUP_FIRST_LOG2
        index = min(max(index, 0), ROUNDUP_INTERVALS - 1)
        return self.roundup_power2_divisions[index]

    def as_snapshot_dict(self) -> dict:
        """The ``allocator_settings`` entry of a memory snapshot (plain types only)."""
        return {
            "PYTORCH_CUDA_ALLOC_CONF": self.alloc_conf,
            "max_split_size": -1 if self.max_split_size is None else self.max_split_size,
            "garbage_collection_threshold": self.garbage_collection_threshold,
            "expandable_segments": self.expandable_segments,
            "roundup_power2_divisions": list(self.roundup_power2_divisions),
        }


def _parse_roundup(alloc_conf: str, tokens: list[str], i: int) -> tuple[tuple[int, ...], int]:
    """AllocatorConfig::parseRoundUpPower2Divisions: ``N`` for every interval, or
    ``[<MiB>:N,...,>:N]`` per interval (keys are sizes in MiB, powers of two)."""
    if i + 2 >= len(tokens) or tokens[i + 1] != ":":
        raise _fail(alloc_conf, "expected 'roundup_power2_divisions:<value>'")
    i += 2
    table = [0] * ROUNDUP_INTERVALS
    if tokens[i] != "[":
        # backwards-compatible single value: must be a power of two
        if not tokens[i].isdigit() or not _is_pow2(int(tokens[i])):
            raise _fail(alloc_conf, f"roundup_power2_divisions must be a power of 2, got {tokens[i]!r}")
        return (int(tokens[i]),) * ROUNDUP_INTERVALS, i
    first_value = True
    last_index = 0
    i += 1
    while i < len(tokens) and tokens[i] != "]":
        interval = tokens[i]
        if i + 2 >= len(tokens) or tokens[i + 1] != ":" or not tokens[i + 2].isdigit():
            raise _fail(alloc_conf, "roundup_power2_divisions entries are <MiB>:<divisions>")
        divisions = int(tokens[i + 2])
        i += 2
        if divisions != 0 and not _is_pow2(divisions):
            raise _fail(alloc_conf, f"roundup divisions must be a power of 2 or 0, got {divisions}")
        if interval == ">":
            # std::fill from last_index (inclusive) to the end, as the source does
            table[last_index:] = [divisions] * (ROUNDUP_INTERVALS - last_index)
        else:
            if not interval.isdigit() or not _is_pow2(int(interval)):
                raise _fail(alloc_conf, f"roundup intervals must be powers of 2 (MiB), got {interval!r}")
            index = min(max(int(interval).bit_length() - 1, 0), ROUNDUP_INTERVALS - 1)
            if first_value:
                table[:index] = [divisions] * index
                first_value = False
            table[index] = divisions
            last_index = index
        if i + 1 < len(tokens) and tokens[i + 1] == ",":
            i += 1
        i += 1
    if i >= len(tokens):
        raise _fail(alloc_conf, "roundup_power2_divisions list lacks ']'")
    return tuple(table), i
