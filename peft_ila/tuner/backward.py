"""Backward stops at the lowest adapted block, gradient checkpointing or not.

With gradient checkpointing, transformers (`enable_input_require_grads`) and peft hook the input embeddings so that
their output requires grad; every backward then runs through all blocks, even those below the lowest adapter. An
`InputGradRouter` removes those hooks and makes the input of the lowest checkpointed block that holds a trainable
adapter require grad instead: backward stops there and the blocks below run forward only. That is the selected
state's saving. transformers checkpoints a block's `forward`, so the block's pre-hook runs outside the checkpoint and
reentrant checkpointing still reaches the adapters inside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

_EMBEDDING_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")  # transformers', peft's fallback


class InputGradRouter:
    """Keeps at most one pre-hook, on the lowest checkpointed block for which `holds_adapter(block)` is True."""

    def __init__(self) -> None:
        self.block: nn.Module | None = None
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def route(self, model: nn.Module, holds_adapter: Callable[[nn.Module], bool]) -> None:
        """Call before a training forward; cheap when checkpointing never hooked the embeddings."""
        embeddings = _input_embeddings(model)
        hooks = [k for k, fn in embeddings._forward_hooks.items() if _is_embedding_hook(fn)] if embeddings else []
        if not hooks and self.handle is None:
            return
        gc_blocks = (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
        block = next((m for m in gc_blocks if holds_adapter(m)), None)
        if block is None:  # no adapter inside a checkpointed block: the embedding hooks stay
            return
        for key in hooks:  # calling enable_input_require_grads twice orphans a handle: go by the hooks themselves
            del embeddings._forward_hooks[key]
        if block is not self.block:
            self.remove()
            self.block, self.handle = block, block.register_forward_pre_hook(_inputs_require_grad, with_kwargs=True)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.block = self.handle = None


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None


def _is_embedding_hook(fn: Any) -> bool:
    return getattr(fn, "__name__", "") in _EMBEDDING_HOOKS


def _inputs_require_grad(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the block's input hidden states (a leaf while nothing below trains) require grad."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    needed = module.training and torch.is_grad_enabled() and torch.is_tensor(hidden) and hidden.is_floating_point()
    if needed and not hidden.requires_grad:
        hidden.requires_grad_(True)
