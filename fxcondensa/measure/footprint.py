"""How many bytes a model takes: Condensa's values-only accounting, and the size of a real compact file.

Data flows one way: this module reads the writer (``serialize``: storage dtypes, the file itself); the
writer never imports this module.
"""

from __future__ import annotations

import os
import tempfile

from torch import nn

from ..files.serialize import save_compressed, storage_dtypes

__all__ = ["footprint", "storage_dtypes"]

ACCOUNTINGS = ("values", "stored")


def footprint(model: nn.Module, accounting: str = "values") -> int:
    """Bytes of ``model``'s parameters.

    ``"values"``: non-zero values times the byte size of their storage dtype (Condensa's accounting, behind
    the tutorial's 239x). ``"stored"``: the size of the file that ``save_compressed`` writes for the model
    (sparse indices, reduced dtypes, and the file format's own overhead).

    Example:
        >>> import fxcondensa
        >>> fxcondensa.footprint(fxcondensa.models.LeNet5())
        1724320
    """
    if accounting == "values":
        dtypes = storage_dtypes(model)
        return sum(int(p.count_nonzero()) * dtypes[n].itemsize for n, p in model.named_parameters())
    if accounting == "stored":
        fd, path = tempfile.mkstemp(suffix=".fxc")
        os.close(fd)
        try:
            save_compressed(model, path, overwrite=True)
            return os.path.getsize(path)
        finally:
            os.unlink(path)
    raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
