"""Write a compressed Hugging Face model back as a Hugging Face directory (``save_pretrained``), where it can be.

``compress`` and ``thin`` return a ``GraphModule`` whose state-dict keys are the original model's. When every
tensor also kept its shape (``compress``: zeros and rounded values; ``thin`` when nothing was removed), the
values fit the original architecture: they are loaded into a copy of the original ``PreTrainedModel`` and
written with its ``save_pretrained``, so ``AutoModel.from_pretrained`` reads the result. A thinned model whose
layers lost channels is refused: a Hugging Face config holds one width per kind of layer (one
``intermediate_size`` for every block), which cannot describe layers thinned to different widths. Save those
with ``save_thinned`` (reloaded with ``load_thinned``) or export them.

The directory is written beside the target under a temporary name and renamed into place: an interrupted
write leaves no half-written directory under the target's name.

Example:
    >>> import tempfile, torch, transformers, fxcondensa
    >>> config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                                  intermediate_size=32)
    >>> bert = transformers.BertModel(config).eval()
    >>> x = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    >>> same = fxcondensa.thin(bert, None, x)  # no channel is zero: nothing is removed, every shape stays
    >>> folder = save_pretrained_like(same, bert, tempfile.mkdtemp() + "/bert")
    >>> again = transformers.BertModel.from_pretrained(folder).eval()
    >>> torch.equal(again(**x).last_hidden_state, bert(**x).last_hidden_state)
    True
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import FxCondensaError
from .sources import quiet_transformers

__all__ = ["save_pretrained_like", "SavePretrainedError"]


class SavePretrainedError(FxCondensaError, ValueError):
    """The result cannot be written as a Hugging Face directory of the original architecture."""


def _shape(t: object) -> str:
    return "x".join(str(s) for s in getattr(t, "shape", ()))


def save_pretrained_like(result: nn.Module, original: nn.Module, folder: str | os.PathLike[str], *,
                         overwrite: bool = False) -> Path:
    """Write ``result``'s values as ``original``'s architecture to ``folder`` with ``save_pretrained``.

    ``original`` is the ``PreTrainedModel`` that was compressed (left unchanged); raises
    ``SavePretrainedError`` naming a tensor whose name or shape no longer fits. See the module's text.
    """
    target = Path(folder)
    if not callable(getattr(original, "save_pretrained", None)):
        raise SavePretrainedError(f"save_pretrained: the original model is a {type(original).__name__}, not a "
                                  "Hugging Face PreTrainedModel; save the result with save_thinned or an export")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    values, expected = result.state_dict(), original.state_dict()
    missing = [k for k in expected if k not in values]
    if missing:
        raise SavePretrainedError(f"save_pretrained to {target}: the result has no tensor {missing[0]!r} of "
                                  f"{type(original).__name__} ({len(missing)} missing); save it with save_thinned")
    changed = [k for k, v in expected.items() if values[k].shape != v.shape]
    if changed:
        k = changed[0]
        raise SavePretrainedError(
            f"save_pretrained to {target}: thinning changed {len(changed)} tensors' shapes (e.g. {k}: "
            f"{_shape(expected[k])} -> {_shape(values[k])}), and a Hugging Face config has one width per kind of "
            "layer, so it cannot describe the thinned layers. Save with save_thinned (--save out.fxt; reload "
            "with fxcondensa.load_thinned) or export (--export out.pt2)")
    copy_ = copy.deepcopy(original)
    copy_.load_state_dict({k: values[k] for k in expected}, strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with quiet_transformers():
            copy_.save_pretrained(tmp)
        # mkdtemp makes the folder private (and writers may make files so): give them normal modes
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        old = None
        if target.exists():  # overwrite: move the old one aside first, delete it once the new one is in place
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
