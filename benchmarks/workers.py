"""What the fresh-process benchmarks (llmcompressor_gptq.py, transformers_gptq.py) share: thread pools,
process memory, versions and commit, and logits of a model with swapped-in weights."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3


def set_threads(n: int, extra: tuple[str, ...] = ()) -> None:
    """Before torch is imported: every thread pool to n (the env is inherited by the workers); `extra`
    names further variables a baseline library reads (gptqmodel's worker counts)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", *extra):
        os.environ[var] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set (only possible once per process)
        pass


def proc_mem() -> dict:
    """VmRSS / VmHWM / RssAnon of this process in GiB (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024 / GiB
    return out


def versions(packages: tuple[str, ...]) -> dict:
    """{"python": ..., package: its installed version or None}."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def own_logits(model, ids):
    """The model's float logits on ids (n, seq), in batches of 8."""
    import torch

    with torch.no_grad():
        return torch.cat([model(ids[i:i + 8]).logits.float() for i in range(0, ids.shape[0], 8)])


def logits_with(model_fp, weights: dict, ids):
    """Logits of a copy of `model_fp` whose named linears hold `weights` (dequantized, float)."""
    import copy

    import torch

    model = copy.deepcopy(model_fp)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    return own_logits(model, ids)


def weight_error(weights: dict, fp: dict) -> dict:
    """Mean and per-linear relative Frobenius error ||W_q - W|| / ||W||."""
    per = {n: float((weights[n].float() - fp[n]).norm() / fp[n].norm()) for n in fp}
    return {"mean_rel_weight_err": statistics.fmean(per.values()), "per_linear_rel_weight_err": per}
