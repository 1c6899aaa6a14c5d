"""`import peft_ila` makes ILA a PEFT type; importing or reloading again is harmless; moved internals fail clearly."""

import enum
import importlib
import subprocess
import sys

import pytest
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_ila
from peft_ila import ILAConfig, ILAModel
from peft_ila.tuner import _peft_compat


def test_ila_is_a_peft_type():
    assert PeftType.ILA is PeftType("ILA") is peft_ila.PEFT_TYPE
    assert "ILA" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ILA"] is ILAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["ILA"] is ILAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["ILA"] == "ila_"


def test_reimport_and_reload_are_harmless():
    code = (
        "import importlib, peft_ila, peft_ila.tuner._peft_compat as c\n"
        "import peft_ila\n"
        "importlib.reload(c); importlib.reload(peft_ila)\n"
        "from peft import PeftType, get_peft_model\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "assert list(PeftType).count(PeftType.ILA) == 1\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING['ILA'] is peft_ila.ILAModel\n"
        "import torch\n"
        "config = peft_ila.ILAConfig(target_modules=['0'], top_k=1)\n"
        "m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)\n"
        "print(type(m.base_model).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ILAModel"


def test_moved_peft_internals_fail_with_a_clear_message(monkeypatch):
    from peft.utils import peft_types

    class NotAnEnum:
        pass

    monkeypatch.setattr(peft_types, "PeftType", NotAnEnum)
    with pytest.raises(ImportError, match=r"no longer a str Enum.*pip install 'peft>=0\.21\.0,<0\.22\.0'"):
        _peft_compat._extend_peft_type("ILA")
    monkeypatch.setattr(peft_types, "PeftType", enum.Enum("IntTypes", {"A": 1}))
    with pytest.raises(ImportError, match="no longer a str Enum"):
        _peft_compat._extend_peft_type("ILA")


def test_reload_in_process_keeps_classes():
    importlib.reload(peft_ila)
    assert PEFT_TYPE_TO_TUNER_MAPPING["ILA"] is ILAModel  # submodules are not reloaded: same classes
