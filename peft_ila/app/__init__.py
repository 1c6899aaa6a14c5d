"""The application layer: data, model loading, the `peft-ila` command line, reports and plots.

The two wings of the package, `peft_ila.tuner` and `peft_ila.identification`, import nothing from here.
"""

import os
from pathlib import Path


class UsageError(Exception):
    """A mistake the user can fix; the CLI prints its message on one line and exits with status 2."""


def cache_dir() -> Path:
    """Where downloaded data and converted models are kept: $PEFT_ILA_CACHE, default ~/.cache/peft-ila."""
    return Path(os.environ.get("PEFT_ILA_CACHE", "~/.cache/peft-ila")).expanduser()
