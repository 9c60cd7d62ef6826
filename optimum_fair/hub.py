"""Publishing a quantized model: a complete output folder with its model card, and the Hub push.

    save_quantized(model, "out/llada-w4a4", tokenizer=tok, metrics={"FP": fp, "W4A4": q})
    push_quantized("out/llada-w4a4", "me/llada-w4a4")        # refuses a repo that already has files
    model.push_to_hub("me/llada-w4a4")                        # same folder, built in a temp dir

A folder holds ``save_pretrained``'s safetensors + config.json, the tokenizer, the Stage I prior in
``prior/`` (from ``model.fair_prior``) and a README.md model card (`build_card`). It is written to a
temporary folder beside the target and moved into place at the end (config.json last), so an
interrupted save never leaves a folder that looks complete.

`attach_hub_methods` (called by the pipeline when it marks a model quantized) makes the instance's
``save_pretrained`` write the prior and card too, and its ``push_to_hub`` upload that folder:
transformers' own ``push_to_hub`` rewrites README.md with a generic card after saving, so it cannot be
reused as is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import MethodType
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .distributed import is_main_process

logger = logging.getLogger(__name__)

REPO_PLACEHOLDER = "<this-repo-id>"  # replaced by the repo id when the folder is pushed
PRIOR_DIR = "prior"
KEPT_REMOTE = {".gitattributes"}  # files a fresh Hub repo already has
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class HubPushError(RuntimeError):
    """The Hub refused or failed an upload; the local folder is unchanged."""


# -- model card ------------------------------------------------------------------------------
def quant_tag(config: Any) -> str:
    """"w4a4", "w4a8", "w8a8", "w4a16" ... from the config's bit widths."""
    return f"w{config.w_bits}a{config.a_bits}"


def _repo_id_of(model: Any) -> str | None:
    """The model's ``name_or_path`` when it is a Hub repo id and not a local path."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name or not _REPO_ID.match(str(name)) or os.path.exists(name):
        return None
    return str(name)


def hub_base_model(model: Any, base_model: str | None = None) -> str | None:
    """The full-precision base model's Hub id: ``base_model``, else the model's ``name_or_path`` when it
    is a repo id (not a local path) and the model was quantized in this process. None when unknown: a
    local base, or a reloaded quantized checkpoint (its name is the quantized repo, not the base)."""
    if base_model:
        if not _REPO_ID.match(base_model):
            raise ValueError(f"base_model {base_model!r} is not a Hub repo id ('namespace/name')")
        return base_model
    return None if getattr(model, "_fair_reloaded", False) else _repo_id_of(model)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _quality_section(metrics: dict[str, Any]) -> str:
    """metrics: {row name: evaluate() dict} (or one evaluate() dict) -> markdown section."""
    from .evaluate import HEADLINE, table

    rows = metrics if all(isinstance(v, dict) for v in metrics.values()) else {"quantized": metrics}
    present = [k for k in HEADLINE if any(k in r for r in rows.values())]
    extra = sorted({k for r in rows.values() for k in r if "/" in k and k.split("/", 1)[1] in HEADLINE})
    text = table(rows, columns=present + extra or None, transpose=True)
    return ("## Measured quality\n\nMasked-token NLL / accuracy at mask ratio 0.5 on held-out text; frontier flip "
            "rate on the full-precision teacher's greedy trajectories (all decisions, and at teacher margin >= 0.1); "
            "agreement = share of greedy-decoded tokens equal to the teacher's (`optimum_fair.evaluate`).\n\n"
            f"{text}\n")


def _calibration_section(log: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in log for k in r))
    rows = [[f"{r.get(k):.4g}" if isinstance(r.get(k), float) else r.get(k, "-") for k in keys] for r in log]
    return ("## Calibration\n\nPer-block weighted output MSE after calibration (`loss`) and with "
            f"round-to-nearest (`loss_rtn`):\n\n{_md_table(keys, rows)}\n")


def _config_section(config: Any) -> str:
    rows = [[k, "-" if v is None else v] for k, v in config.to_dict().items()]
    return f"## Quantization config\n\n{_md_table(['field', 'value'], rows)}\n"


def build_card(model: Any, metrics: dict[str, Any] | None = None, base_model: str | None = None,
               repo_id: str | None = None) -> ModelCard:
    """The model card of a quantized ``model``: Hub metadata, config, quality, calibration, usage."""
    config = _quant_config(model)
    base = hub_base_model(model, base_model)
    model_type = str(getattr(model.config, "model_type", "model"))
    tags = ["fair-calib", quant_tag(config), "diffusion-lm", model_type.lower(), "optimum-fair"]
    data = ModelCardData(base_model=base, base_model_relation="quantized" if base else None,
                         library_name="transformers", pipeline_tag="text-generation", tags=tags)
    source = base or getattr(model, "name_or_path", None) or "a full-precision model"
    has_prior = getattr(model, "fair_prior", None) is not None
    parts = [
        f"# {quant_tag(config).upper()} FAIR-Calib quantization of {source}\n",
        f"`{source}` ({model_type}, a masked diffusion language model) with {config.w_bits}-bit weights and "
        + (f"{config.a_bits}-bit activations" if config.a_bits < 16 else "floating-point activations")
        + ", quantized by optimum-fair with FAIR-Calib (frontier-aware instability-reweighted calibration, "
        "[arXiv 2606.06547](https://arxiv.org/abs/2606.06547)): a position prior from the full-precision "
        "teacher's diffusion rollouts (Stage I) weights a block-wise calibration (Stage II). Linear layers are "
        "stored packed; the config below is also in `config.json` under `quantization_config`, so loading "
        "never recalibrates.\n",
        _config_section(config),
    ]
    if metrics:
        parts.append(_quality_section(metrics))
    if getattr(model, "fair_calibration_log", None):
        parts.append(_calibration_section(model.fair_calibration_log))
    if has_prior:
        parts.append(f"## Files\n\n`{PRIOR_DIR}/` holds the Stage I position prior (`prior.safetensors`, "
                     "`prior.json` with its decode settings); reuse it with `FairCalibConfig(prior=...)`.\n")
    parts.append(_usage_section(repo_id or REPO_PLACEHOLDER))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def _usage_section(repo_id: str) -> str:
    return ("## How to load\n\n```python\nimport optimum_fair  # registers fair_calib and the native LLaDA / Dream "
            "classes\nfrom transformers import AutoModel, AutoTokenizer\n\n"
            f'model = AutoModel.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            'print(optimum_fair.generate(model, tokenizer, "The history of", gen_length=64))\n```\n\n'
            f"or `optimum-fair generate {repo_id} \"The history of\"`.\n")


def _quant_config(model: Any) -> Any:
    from .config import FairCalibConfig

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "fair_calib":
        config = FairCalibConfig.from_dict(config)
    if not isinstance(config, FairCalibConfig):
        raise ValueError(f"{type(model).__name__} is not quantized by optimum-fair "
                         "(model.config.quantization_config is not a FairCalibConfig): run optimum_fair.quantize first")
    return config


# -- saving ----------------------------------------------------------------------------------
def save_quantized(model: Any, output_dir: str | os.PathLike, tokenizer: Any = None,
                   metrics: dict[str, Any] | None = None, *, base_model: str | None = None,
                   repo_id: str | None = None, overwrite: bool = False, **save_kwargs: Any) -> Path:
    """Write a complete folder: safetensors weights + config, tokenizer, ``prior/``, README.md.

    The folder is assembled beside ``output_dir`` and moved into place at the end. An existing
    non-empty ``output_dir`` raises FileExistsError unless ``overwrite`` (its files are then replaced,
    others kept). ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``)."""
    if not is_main_process():  # data-parallel runs: only rank 0 writes (no barrier: callers may guard too)
        return Path(output_dir)
    card = build_card(model, metrics, base_model, repo_id)  # bad input fails before any write
    tokenizer = resolve_tokenizer(tokenizer, model)
    target = Path(output_dir)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output_dir {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir {target} is not empty (pass overwrite=True to replace its files)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        type(model).save_pretrained(model, tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if getattr(model, "fair_prior", None) is not None:
            model.fair_prior.save(tmp / PRIOR_DIR)
        card.save(tmp / "README.md")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved quantized model to %s", target)
    return target


def resolve_tokenizer(tokenizer: Any, model: Any) -> Any:
    """A tokenizer object from an object or a path. None: the model's own, from its local folder (errors
    raise) or from its Hub repo (a failure there only warns); None when it has neither."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    local = getattr(model, "name_or_path", None)
    if tokenizer is None and local and any((Path(local) / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = local
    if tokenizer is not None:
        try:
            return AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load the tokenizer {str(tokenizer)!r}: {err}") from None
    repo = _repo_id_of(model)
    if repo is None:
        logger.info("no tokenizer given and none beside the model: the folder will have no tokenizer")
        return None
    try:
        return AutoTokenizer.from_pretrained(repo)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer saved: loading the base model's tokenizer %s failed (%s)", repo, err)
        return None


def _move_into_place(tmp: Path, target: Path) -> None:
    """Move every entry of tmp into target (config.json last); drop target's stale weights and prior."""
    if not target.exists():
        tmp.rename(target)
        return
    new = {p.name for p in tmp.iterdir()}
    for old in target.iterdir():
        stale_weights = old.name.startswith("model") and ".safetensors" in old.name and old.name not in new
        if stale_weights or (old.name == PRIOR_DIR and PRIOR_DIR not in new):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    (target / "config.json").unlink(missing_ok=True)  # the folder does not look complete until the end
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        dest = target / entry.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(entry, dest)


# -- pushing ---------------------------------------------------------------------------------
def require_token(token: str | None = None, repo_id: str | None = None) -> str:
    """The token to push with (``token``, HF_TOKEN or the saved login); a clear error when none."""
    if repo_id is not None:
        _check_repo_id(repo_id)
    found = token or get_token()
    if not found:
        raise ValueError("no Hugging Face token: pass token=..., set HF_TOKEN, or run `hf auth login` "
                         "(a write token is needed to push)")
    return found


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id ('namespace/name'): {err}") from None


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """A folder written by `save_quantized`: config.json with a fair_calib quantization_config and weights."""
    path = Path(output_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a folder written by save_quantized")
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "fair_calib":
        raise ValueError(f"{config_file} has no fair_calib quantization_config: not an optimum-fair model")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    return path


def _operations(folder: Path, repo_id: str) -> list[CommitOperationAdd]:
    ops = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # hidden files and folders (.git, editor state) stay local
        if rel == "README.md":  # the card names its own repo
            ops.append(CommitOperationAdd(rel, file.read_bytes().replace(REPO_PLACEHOLDER.encode(), repo_id.encode())))
        else:
            ops.append(CommitOperationAdd(rel, str(file)))
    return ops


def push_quantized(output_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                   overwrite: bool = False, commit_message: str = "Upload FAIR-Calib quantized model",
                   revision: str | None = None, endpoint: str | None = None) -> str:
    """Upload a `save_quantized` folder to ``repo_id`` in one commit; returns the commit URL.

    The repo is created if missing. A repo with files (other than .gitattributes) is refused unless
    ``overwrite``, in which case the commit also deletes remote files the folder does not have. Raises
    ValueError for a bad repo id or no token and FileNotFoundError/ValueError for a bad folder, before
    any request; HubPushError when the Hub fails (the local folder is never modified; rerun to retry)."""
    if not is_main_process():  # data-parallel runs: only rank 0 pushes
        return ""
    folder = check_output_dir(output_dir)
    token = require_token(token, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision)) - KEPT_REMOTE
        ops: list = _operations(folder, repo_id)
        if remote and not overwrite:
            raise HubPushError(f"{repo_id} already has files ({sorted(remote)[:5]}...); pass overwrite=True "
                               "(--overwrite) to replace them")
        ops += [CommitOperationDelete(p) for p in sorted(remote - {op.path_in_repo for op in ops})]
        info = api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        raise HubPushError(f"pushing {folder} to {repo_id} failed (HTTP {status}: {str(err).splitlines()[0]}); "
                           "nothing local was changed, rerun to retry") from err
    logger.info("pushed %s to %s: %s", folder, repo_id, info.commit_url)
    return str(info.commit_url)


def push_model(model: Any, repo_id: str, tokenizer: Any = None, metrics: dict[str, Any] | None = None, *,
               token: str | None = None, private: bool = False, overwrite: bool = True,
               commit_message: str = "Upload FAIR-Calib quantized model", keep_on_failure: bool = False,
               **save_kwargs: Any) -> str:
    """`save_quantized` into a temporary folder, then `push_quantized` it. With ``keep_on_failure`` a
    failed push keeps the folder and names it in the error, so the upload can be retried."""
    if not is_main_process():  # data-parallel runs: only rank 0 pushes
        return ""
    token = require_token(token, repo_id)
    with tempfile.TemporaryDirectory(prefix="optimum-fair-push-") as tmp:
        folder = save_quantized(model, Path(tmp) / "model", tokenizer, metrics, repo_id=repo_id, **save_kwargs)
        try:
            return push_quantized(folder, repo_id, token=token, private=private, overwrite=overwrite,
                                  commit_message=commit_message)
        except HubPushError as err:
            if not keep_on_failure:
                raise
            kept = Path(tempfile.mkdtemp(prefix="optimum-fair-unpushed-"))
            shutil.copytree(folder, kept, dirs_exist_ok=True)
            raise HubPushError(f"{err}. The quantized model was saved to {kept}: push it with "
                               f"`optimum-fair push {kept} {repo_id}`") from err


# -- the model's own save_pretrained / push_to_hub --------------------------------------------
def attach_hub_methods(model: Any, tokenizer: Any = None, reloaded: bool = False) -> None:
    """Make ``model.save_pretrained`` write the prior and card too and ``model.push_to_hub`` upload them.
    ``reloaded``: the model is a saved checkpoint loaded back (its name is not its base model's)."""
    model._fair_reloaded = reloaded
    model.save_pretrained = MethodType(_save_pretrained, model)
    model.push_to_hub = MethodType(_push_to_hub, model)
    model._fair_tokenizer = tokenizer  # an object or a path; None: the model's own folder, if it has one


def load_saved_prior(model: Any, checkpoint_files: list[str] | None) -> None:
    """Set ``model.fair_prior`` from the ``prior/`` folder beside a local checkpoint, when there is one
    (a Hub download fetches only the weights and config, so the prior stays in the repo)."""
    if not checkpoint_files:
        return
    folder = Path(checkpoint_files[0]).parent / PRIOR_DIR
    if (folder / "prior.json").is_file():
        from .scoring.prior import PositionPrior

        model.fair_prior = PositionPrior.load(folder)


def _save_pretrained(self: Any, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                     repo_id: str | None = None, token: str | None = None, commit_message: str | None = None,
                     private: bool | None = None, **kwargs: Any) -> None:
    """``save_pretrained`` plus the tokenizer, ``prior/`` and README.md (other files in the folder are kept)."""
    kwargs.pop("create_pr", None)
    save_quantized(self, save_directory, getattr(self, "_fair_tokenizer", None), overwrite=True,
                   repo_id=repo_id, **kwargs)
    if push_to_hub:
        push_quantized(save_directory, repo_id or Path(save_directory).name, token=token, private=bool(private),
                       overwrite=True, commit_message=commit_message or "Upload FAIR-Calib quantized model")


def _push_to_hub(self: Any, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                 token: str | bool | None = None, max_shard_size: int | str | None = "50GB",
                 **ignored: Any) -> str:
    """``PushToHubMixin.push_to_hub`` for a FAIR-Calib model: weights, tokenizer, prior and model card."""
    if ignored:
        logger.warning("push_to_hub: ignoring %s (not supported for optimum-fair models)", sorted(ignored))
    return push_model(self, repo_id, getattr(self, "_fair_tokenizer", None),
                      token=token if isinstance(token, str) else None, private=bool(private),
                      commit_message=commit_message or "Upload FAIR-Calib quantized model",
                      max_shard_size=max_shard_size)
