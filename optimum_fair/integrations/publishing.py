"""The one adapter that makes a quantized model's own `save_pretrained` / `push_to_hub` publish it whole.

transformers offers no hook for extra files: `PreTrainedModel.save_pretrained` asks the quantizer only for
the state dict (`get_state_dict_and_metadata`), and `PushToHubMixin.push_to_hub` overwrites README.md with
a generic card after saving. Users expect `model.push_to_hub(repo)` to publish a complete repo, so
`bind_publishing` binds two methods on the model instance:

* `save_pretrained(dir)`: `export.folder.save_quantized` (weights, config, tokenizer, `prior/`, card);
* `push_to_hub(repo)`: `export.hub.push_model` (that folder, built in a temporary directory, one commit).

Both read the model's `CalibrationResult` and tokenizer from `model.hf_quantizer`; nothing else is set
on the model. `tests/integrations/test_publishing.py` checks both against the loopback Hub.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import MethodType
from typing import Any

logger = logging.getLogger(__name__)

COMMIT_MESSAGE = "Upload FAIR-Calib quantized model"


def bind_publishing(model: Any) -> None:
    """Bind the two publishing methods on `model` (a quantized model with a FairCalibHfQuantizer)."""
    model.save_pretrained = MethodType(_save_pretrained, model)
    model.push_to_hub = MethodType(_push_to_hub, model)


def _tokenizer(model: Any) -> Any:
    return getattr(model.hf_quantizer, "tokenizer", None)  # None: the model's own folder, if it has one


def _save_pretrained(self: Any, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                     repo_id: str | None = None, token: str | None = None, commit_message: str | None = None,
                     private: bool | None = None, overwrite: bool = False, **kwargs: Any) -> None:
    """``save_pretrained`` plus the tokenizer, ``prior/`` and README.md (other files in the folder are kept).

    As transformers' own it writes over an earlier save of a FAIR-Calib model of this type; a folder that
    holds another model (a full-precision teacher, another architecture or quantizer) is refused before
    anything is written unless ``overwrite=True``."""
    from ..export.folder import other_model_in, save_quantized  # the exporters load on first save, not on load
    from ..export.hub import push_quantized

    kwargs.pop("create_pr", None)
    other = None if overwrite else other_model_in(save_directory, self)
    if other:
        raise FileExistsError(f"save_pretrained({str(save_directory)!r}): {other}; refusing to write over it "
                              "(pass overwrite=True, or save to another folder)")
    save_quantized(self, save_directory, _tokenizer(self), overwrite=True, repo_id=repo_id, **kwargs)
    if push_to_hub:
        push_quantized(save_directory, repo_id or Path(save_directory).name, token=token, private=bool(private),
                       update=True, commit_message=commit_message or COMMIT_MESSAGE)  # never deletes remote files


def _push_to_hub(self: Any, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                 token: str | bool | None = None, max_shard_size: int | str | None = "50GB",
                 **ignored: Any) -> str:
    """``PushToHubMixin.push_to_hub`` for a FAIR-Calib model: weights, tokenizer, prior and model card.
    As transformers' own, it adds or replaces files and deletes none of the repo's others."""
    from ..export.hub import push_model  # the exporters load on first push, not on load

    if ignored:
        logger.warning("push_to_hub: ignoring %s (not supported for optimum-fair models)", sorted(ignored))
    return push_model(self, repo_id, _tokenizer(self), token=token if isinstance(token, str) else None,
                      private=bool(private), commit_message=commit_message or COMMIT_MESSAGE,
                      max_shard_size=max_shard_size)
