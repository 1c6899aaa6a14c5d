"""What peft-ila's own import must not print: bitsandbytes' notice about a kernel peft-ila never uses.

peft imports bitsandbytes eagerly when it is installed. On a CPU with AVX512-BF16, bitsandbytes then tries to fetch
an optional kernel for its packed 4-bit CPU inference from the Hugging Face Hub and, offline or without the `kernels`
package, logs "Failed to load CPU gemm_4bit_forward from kernels-community ...". peft-ila turns that packed path off
on every 4-bit layer of a model it loads or gives ILA adapters (`tuner.model.keep_4bit_layers_differentiable`: the
packed kernel passes no gradient to its input), so the notice means nothing for a peft-ila user, 4-bit or not, and is
dropped while peft-ila imports peft. Every other record of bitsandbytes, and that one outside peft-ila's import, is
left alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
UNUSED_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_unused_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(UNUSED_KERNEL_NOTICE)


@contextlib.contextmanager
def without_unused_bitsandbytes_notice() -> Iterator[None]:
    """Within the block, bitsandbytes' CPU backend logs everything but `UNUSED_KERNEL_NOTICE`."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    logger.addFilter(_not_the_unused_kernel_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_unused_kernel_notice)
