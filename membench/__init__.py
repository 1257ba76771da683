"""membench: how much GPU memory a fine-tuning run takes, why, and whether it fits."""

import logging

# bitsandbytes (imported by PEFT whenever it is installed) tries, on CPUs with AVX512-BF16, to fetch
# an inference kernel from the Hugging Face Hub at import and logs a warning on every run when it
# cannot (offline, or the repository is not trusted). membench never uses that kernel (training runs
# bitsandbytes' gemm_4bit op; see membench.backends.quantized_kernels), so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
