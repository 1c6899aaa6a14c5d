"""`peft-ila export-lora`: an ILA adapter as a plain LoRA adapter that vanilla peft loads without peft-ila."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from ..tuner.selection import SAVED_KEYS, Selection, layer_of
from . import UsageError
from .files import check_free, read_json, staged_dir


def export_lora(adapter_dir: Path, out_dir: Path, overwrite: bool = False) -> list[str]:
    """Write `out_dir` with peft_type LORA, explicit target module names and renamed weights; returns the modules.

    ILA's update is LoRA's (B @ A * lora_alpha / r) and a saved adapter has no gate, so the logits are equal.
    """
    from peft import LoraConfig

    adapter_dir = Path(adapter_dir)
    check_free(Path(out_dir), overwrite)
    config = read_json(adapter_dir / "adapter_config.json", "an ILA adapter directory (written by `peft-ila train`)")
    if config.get("peft_type") != "ILA":
        raise UsageError(f"{adapter_dir} holds a {config.get('peft_type')} adapter, not an ILA one.")
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise UsageError(f"{weights_file} is missing: export needs the adapter's safetensors file.")
    saved = load_file(weights_file)
    try:
        selected = set(Selection.from_tensors(saved).selected)
    except ValueError as exc:
        raise UsageError(f"{weights_file}: {exc}") from None
    tensors = {k: v for k, v in saved.items() if k not in SAVED_KEYS}
    modules = sorted({k.removeprefix("base_model.model.").split(".ila_A.")[0] for k in tensors if ".ila_A." in k})
    granularity = config.get("granularity", "module")
    if {layer_of(module, granularity) for module in modules} != selected:
        raise UsageError(
            f"{weights_file} holds adapter weights for other layers than its mask selects ({len(selected)} layers); "
            "the file was altered, save the adapter again."
        )
    renamed = {k.replace(".ila_A.", ".lora_A.").replace(".ila_B.", ".lora_B."): v for k, v in tensors.items()}
    lora = LoraConfig(
        task_type=config.get("task_type"),
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=modules,
        modules_to_save=config.get("modules_to_save"),
        bias=config.get("bias", "none").replace("ila_only", "lora_only"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        revision=config.get("revision"),
    )
    with staged_dir(Path(out_dir), overwrite, "a LoRA adapter written by export-lora") as tmp:
        lora.save_pretrained(tmp)
        save_file(renamed, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return modules
