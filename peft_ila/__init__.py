"""peft-ila: ILA (Shi et al., arXiv 2410.17875) as a PEFT tuner.

`import peft_ila` registers the PEFT type "ILA", so `get_peft_model(model, ILAConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModelFor*.from_pretrained` work with ILA adapters.
"""

from ._peft_compat import ILA as PEFT_TYPE
from ._peft_compat import register as _register
from .callback import ILACallback
from .config import ILAConfig, resolve_top_k
from .importance import ILAResult, identify_important_layers
from .layer import GateBank, ILALayer, Linear
from .mask import ILALoadError
from .model import ILAModel

_register(ILAConfig, ILAModel)

__version__ = "0.1.0"
__all__ = [
    "PEFT_TYPE",
    "GateBank",
    "ILACallback",
    "ILAConfig",
    "ILALayer",
    "ILALoadError",
    "ILAModel",
    "ILAResult",
    "Linear",
    "identify_important_layers",
    "resolve_top_k",
]
