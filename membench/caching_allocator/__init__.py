"""A pure-Python model of PyTorch's CUDA caching allocator: replays malloc/free events and
reports reserved memory (what decides a real out-of-memory), not only allocated memory.

Self-contained: it does not import membench's backends; feeding it events is the caller's job.
"""

from membench.caching_allocator.model import CachingAllocatorModel, ModelledOutOfMemory
from membench.caching_allocator.settings import SUPPORTED_KEYS, AllocatorSettings

__all__ = ["AllocatorSettings", "CachingAllocatorModel", "ModelledOutOfMemory", "SUPPORTED_KEYS"]
