"""Pushing a saved folder to the Hub in one commit; the local folder is never modified.

    push_quantized("out/llada-w4a4", "me/llada-w4a4")        # refuses a repo that already has files
    push_model(model, "me/llada-w4a4")                        # save_quantized into a temp dir, then push
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HTTPError  # HTTPError: the client's base (transport too)
from safetensors import SafetensorError

from ..data import _TOKENIZER_FILES
from ..digests import check_digests
from ..distributed import is_main_process
from ..naming import check_repo_id
from .card import REPO_PLACEHOLDER
from .folder import check_output_dir, save_quantized

logger = logging.getLogger(__name__)

KEPT_REMOTE = {".gitattributes"}  # files a fresh Hub repo already has


class HubPushError(RuntimeError):
    """The Hub refused or failed an upload; the local folder is unchanged."""


def require_token(token: str | None = None, repo_id: str | None = None) -> str:
    """The token to push with (``token``, HF_TOKEN or the saved login); a clear error when none."""
    if repo_id is not None:
        check_repo_id(repo_id)
    found = token or get_token()
    if not found:
        raise ValueError("no Hugging Face token: pass token=... (--token at the CLI), set HF_TOKEN, or run "
                         "`hf auth login` (a write token is needed to push)")
    return found


def _operations(folder: Path, repo_id: str) -> list[CommitOperationAdd]:
    """One upload per file of `folder` (hidden ones stay local); ValueError for a symlink that leaves it."""
    ops = []
    inside = folder.resolve()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # hidden files and folders (.git, editor state) stay local
        if file.is_symlink() and inside not in file.resolve().parents:
            raise ValueError(f"{file} is a symlink to {file.resolve()}, outside the folder: refusing to upload "
                             "that file's contents (copy it in if it should be published)")
        if rel == "README.md":  # the card names its own repo
            ops.append(CommitOperationAdd(rel, file.read_bytes().replace(REPO_PLACEHOLDER.encode(), repo_id.encode())))
        else:
            ops.append(CommitOperationAdd(rel, str(file)))
    return ops


def push_quantized(output_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                   overwrite: bool = False, commit_message: str = "Upload FAIR-Calib quantized model",
                   revision: str | None = None, endpoint: str | None = None, update: bool = False) -> str:
    """Upload a `save_quantized` folder to ``repo_id`` in one commit; returns the commit URL.

    The repo is created if missing. A repo with files (other than .gitattributes) is refused unless
    ``update`` (the folder's files are added or replace theirs, the repo's other files stay: what
    transformers' ``push_to_hub`` does) or ``overwrite`` (the commit also deletes the remote files the
    folder does not have). Nothing is ever deleted without ``overwrite=True``. Raises
    ValueError for a bad repo id or no token and FileNotFoundError/ValueError for a bad folder, before
    any request; HubPushError when the Hub fails (the local folder is never modified; rerun to retry)."""
    if not is_main_process():  # data-parallel runs: only rank 0 pushes
        return ""
    return _push(check_pushable(output_dir), repo_id, str(Path(output_dir)), token=token, private=private,
                 overwrite=overwrite, commit_message=commit_message, revision=revision, endpoint=endpoint,
                 update=update)


def check_pushable(output_dir: str | os.PathLike) -> Path:
    """`check_output_dir`, plus weights that read back as written (header, recorded digests); a warning
    when the folder has no model card or no tokenizer (the repo would lack them)."""
    folder = check_output_dir(output_dir)
    for file in sorted(folder.glob("*.safetensors")):
        try:
            check_digests(str(file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err}); refusing to push it") from None
        except ValueError as err:
            raise ValueError(f"{err}; refusing to push it") from None
    if not (folder / "README.md").is_file():
        logger.warning("%s has no README.md: the repo will have no model card (save_quantized writes one)", folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files: AutoTokenizer.from_pretrained on the repo will fail (save the "
                       "tokenizer into the folder first)", folder)
    return folder


def _push(folder: Path, repo_id: str, label: str, *, token: str | None, private: bool, overwrite: bool,
          commit_message: str, revision: str | None = None, endpoint: str | None = None, update: bool = False,
          retry: str = "nothing local was changed, rerun to retry") -> str:
    """push_quantized's work; `label` names the model in errors (never a temporary folder)."""
    ops: list = _operations(folder, repo_id)  # refuses an outside symlink before any request
    token = require_token(token, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision)) - KEPT_REMOTE
        if remote and not (overwrite or update):
            raise HubPushError(f"{repo_id} already has files ({sorted(remote)[:5]}...); pass overwrite=True "
                               "(--overwrite) to replace them")
        if overwrite:
            ops += [CommitOperationDelete(p) for p in sorted(remote - {op.path_in_repo for op in ops})]
        info = api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision)
    except HTTPError as err:  # an HTTP error answer, or a connection reset / timeout without one
        response = err.response if isinstance(err, HfHubHTTPError) else None
        status = getattr(response, "status_code", None)
        what = f"HTTP {status}" if status else type(err).__name__
        raise HubPushError(f"pushing {label} to {repo_id} failed ({what}: {str(err).splitlines()[0]}); "
                           f"{retry}") from err
    logger.info("pushed %s to %s: %s", label, repo_id, info.commit_url)
    return str(info.commit_url)


def push_model(model: Any, repo_id: str, tokenizer: Any = None, metrics: dict[str, Any] | None = None, *,
               token: str | None = None, private: bool = False, overwrite: bool = False,
               commit_message: str = "Upload FAIR-Calib quantized model", keep_on_failure: bool = False,
               **save_kwargs: Any) -> str:
    """`save_quantized` into a temporary folder, then `push_quantized` it into a new or existing repo
    (``update``: the repo's other files stay unless ``overwrite``). With ``keep_on_failure`` a failed
    push keeps the folder and names it in the error, so the upload can be retried."""
    if not is_main_process():  # data-parallel runs: only rank 0 pushes
        return ""
    token = require_token(token, repo_id)
    with tempfile.TemporaryDirectory(prefix="optimum-fair-push-") as tmp:
        folder = save_quantized(model, Path(tmp) / "model", tokenizer, metrics, repo_id=repo_id, **save_kwargs)
        try:  # errors name the model, not this temporary folder (gone when they are read)
            return _push(folder, repo_id, "the model", token=token, private=private, overwrite=overwrite,
                         commit_message=commit_message, update=True,
                         retry="the repo is unchanged, rerun push_to_hub to retry")
        except HubPushError as err:
            if not keep_on_failure:
                raise
            kept = Path(tempfile.mkdtemp(prefix="optimum-fair-unpushed-"))
            shutil.copytree(folder, kept, dirs_exist_ok=True)
            raise HubPushError(f"{err}. The quantized model was saved to {kept}: push it with "
                               f"`optimum-fair push {kept} {repo_id}`") from err
