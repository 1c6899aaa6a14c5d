"""Notices of other libraries that mean nothing to a peft-ila user and that peft-ila keeps off the screen, each
dropped only where peft-ila itself triggers it; every other record of those loggers is left alone.

- bitsandbytes: peft imports it eagerly when it is installed. On a CPU with AVX512-BF16, bitsandbytes then tries to
  fetch an optional kernel for its packed 4-bit CPU inference from the Hugging Face Hub and, offline or without the
  `kernels` package, logs "Failed to load CPU gemm_4bit_forward from kernels-community ..."; with `HF_HUB_OFFLINE=1`,
  `kernels` first logs "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' ...".
  peft-ila turns that packed path off on every 4-bit layer of a model it loads or gives ILA adapters
  (`tuner.model.keep_4bit_layers_differentiable`: the packed kernel passes no gradient to its input), so both notices
  are dropped while peft-ila imports peft. (Imported before peft-ila, peft prints them before peft-ila can act: import
  peft_ila first, as the quickstart does.)
- DeepSpeed: when it is installed, transformers' `save_pretrained` imports it through accelerate, and on a machine
  without a GPU it logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
  it." peft-ila saves a model that way once, when it caches a dequantised GGUF model, and uses no DeepSpeed there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
UNUSED_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
UNVERIFIED_KERNEL_NOTICE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
DEEPSPEED_LOGGER = "DeepSpeed"
CPU_ACCELERATOR_NOTICE = "Setting accelerator to CPU"


@contextlib.contextmanager
def without_notice(logger_name: str, start: str) -> Iterator[None]:
    """Within the block, the logger `logger_name` logs everything but the records whose message begins with
    `start`."""

    def other(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(start)

    logger = logging.getLogger(logger_name)
    logger.addFilter(other)
    try:
        yield
    finally:
        logger.removeFilter(other)


@contextlib.contextmanager
def without_unused_bitsandbytes_notice() -> Iterator[None]:
    """Within the block, bitsandbytes' CPU backend logs everything but `UNUSED_KERNEL_NOTICE`, and `kernels`
    everything but `UNVERIFIED_KERNEL_NOTICE` (the same optional kernel, looked up offline)."""
    with (
        without_notice(BITSANDBYTES_CPU_LOGGER, UNUSED_KERNEL_NOTICE),
        without_notice(KERNELS_HUB_LOGGER, UNVERIFIED_KERNEL_NOTICE),
    ):
        yield


def without_deepspeed_cpu_notice() -> contextlib.AbstractContextManager[None]:
    """Within the block, DeepSpeed logs everything but `CPU_ACCELERATOR_NOTICE`."""
    return without_notice(DEEPSPEED_LOGGER, CPU_ACCELERATOR_NOTICE)
