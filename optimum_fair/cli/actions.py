"""What each `optimum-fair` subcommand does, given its parsed arguments. Each returns an exit code and
prints its final result to stdout; checks that need no model run before any model is loaded."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from .. import DEFAULT_MODEL
from ..config import is_fair_calib
from ..devices import default_device, execution_device
from ..enums import Weighting
from ..eval.evaluate import HEADLINE, evaluate, table
from ..eval.generation import generate
from ..export import export, push_quantized, require_token, save_quantized
from ..files import atomic_dir
from ..integrations.loading import load_pretrained
from ..integrations.transformers import quantize
from ..naming import check_repo_id, is_repo_id
from ..nn import FairLinear, use_kernels
from ..pipeline import build_prior
from .flags import config_from_args

logger = logging.getLogger(__name__)


# -- models ----------------------------------------------------------------------------------
def resolve_model(name: str | None) -> str:
    """A local folder with config.json or a Hub repo id; None = the bundled teacher (DEFAULT_MODEL)."""
    if name is None:
        if not (Path(DEFAULT_MODEL) / "config.json").is_file():
            raise FileNotFoundError(f"no model given and the bundled teacher is not installed at {DEFAULT_MODEL}")
        return DEFAULT_MODEL
    if os.path.exists(name):
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"model {name}: the folder has no config.json")
        return name
    try:
        return check_repo_id(name, "model")
    except ValueError:
        raise FileNotFoundError(f"model {name!r}: no such folder, and not a Hub repo id ('namespace/name')") from None


def load_model(name: str, dtype: str = "float32", device: str | None = None,
               kernel: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on ``device`` (default: cuda when available, else cpu); the model in
    the class its checkpoint names, so it keeps its LM head (`integrations.loading`); its packed layers
    on `kernel` (`FairLinear.set_kernel`)."""
    device = device or default_device()
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = load_pretrained(name, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    return _on_kernel(model.to(device).eval(), kernel), tokenizer


def _on_kernel(model: Any, kernel: str) -> Any:
    """`use_kernels(model, kernel)` where the model has packed layers and the kernel is not the load's own
    choice ("auto", which from_pretrained and quantize apply)."""
    if kernel != "auto" and any(isinstance(m, FairLinear) for m in model.modules()):
        use_kernels(model, kernel)
    return model


def is_quantized(name: str) -> bool:
    """True when the checkpoint's config has a fair_calib quantization_config (reads config.json only)."""
    return is_fair_calib(getattr(AutoConfig.from_pretrained(name), "quantization_config", None))


def _hub_id(name: str) -> str | None:
    return name if is_repo_id(name) else None


def _check_output_dir(path: str | None, overwrite: bool) -> None:
    if path and Path(path).is_dir() and any(Path(path).iterdir()) and not overwrite:
        raise FileExistsError(f"--output-dir {path} is not empty (pass --overwrite to replace its files)")
    if path and Path(path).exists() and not Path(path).is_dir():
        raise FileExistsError(f"--output-dir {path} exists and is not a directory")


def _eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, dest) for name, dest in args.eval_flag_names.items()}


# -- quantize --------------------------------------------------------------------------------
def run_quantize(args: argparse.Namespace) -> int:
    """Load, (evaluate the FP model,) quantize, (evaluate,) save the folder, (push it)."""
    config = config_from_args(args, args.config_flag_names)
    repo, config.push_to_hub = config.push_to_hub, None  # pushed below, after the local save
    if not args.output_dir and not repo:
        raise ValueError("give --output-dir and/or --push-to-hub")
    _check_output_dir(args.output_dir, args.overwrite)
    if repo:
        require_token(args.token, repo)
    name = resolve_model(args.model)
    model, tokenizer = load_model(name, args.dtype, args.device, args.kernel)
    metrics = None
    if args.eval:
        fp, traces = _evaluate(model, tokenizer, args, teacher=model)
    _on_kernel(quantize(model, config, tokenizer=tokenizer), args.kernel)
    if args.eval:
        metrics = {"FP": fp, config_label(config): _evaluate(model, tokenizer, args, traces=traces)}
        print(_table(metrics, args.all_metrics))
    out = args.output_dir or tempfile.mkdtemp(prefix="optimum-fair-")
    try:
        save_quantized(model, out, tokenizer, metrics, base_model=_hub_id(name), repo_id=repo,
                       overwrite=args.overwrite)
        print(f"saved {out}")
        if repo:
            url = push_quantized(out, repo, token=args.token, private=args.private, overwrite=args.overwrite)
            print(f"pushed {url}")
    finally:
        if not args.output_dir:
            shutil.rmtree(out, ignore_errors=True)
    return 0


def config_label(config: Any) -> str:
    """e.g. "W4A4 gptq+hadamard fair"."""
    return (f"W{config.w_bits}A{config.a_bits} {config.rounding.value}+{config.transform.value} "
            f"{config.weighting.value}")


def _evaluate(model: Any, tokenizer: Any, args: argparse.Namespace, teacher: Any = None, traces=None):
    kwargs = _eval_kwargs(args)
    if teacher is not None:
        return evaluate(model, tokenizer, teacher, return_traces=True, **kwargs)
    return evaluate(model, tokenizer, teacher_traces=traces, **kwargs)


def _table(rows: dict[str, dict], all_metrics: bool) -> str:
    if all_metrics:
        return table(rows, transpose=True)
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    wanted = [k for k in keys if k.rsplit("/", 1)[-1] in HEADLINE]
    return table(rows, columns=wanted, transpose=True)


# -- prior -----------------------------------------------------------------------------------
def run_prior(args: argparse.Namespace) -> int:
    """Stage I alone: the teacher's probe rollouts -> PositionPrior saved in --output-dir."""
    config = config_from_args(args, args.config_flag_names, push_to_hub=None)
    if config.weighting is not Weighting.FAIR:
        raise ValueError("prior needs --weighting fair (the uniform ablation has no prior)")
    _check_output_dir(args.output_dir, args.overwrite)
    model, tokenizer = load_model(resolve_model(args.model), args.dtype, args.device, args.kernel)
    prior = build_prior(model, config, tokenizer)  # the pipeline's own Stage I, split across processes if launched so
    _save_prior(prior, Path(args.output_dir))
    print(f"saved prior ({prior.seq_len} positions, window {prior.window}) to {args.output_dir}")
    return 0


def _save_prior(prior: Any, target: Path) -> None:
    """Write beside the target, then move the files in (prior.json last)."""
    with atomic_dir(target) as tmp:
        prior.save(tmp)
        target.mkdir(exist_ok=True)
        for name in ("prior.safetensors", "prior.json"):
            os.replace(tmp / name, target / name)


# -- eval ------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    """The metrics table of one model or two side by side; the teacher is --base or the FP model.
    With --tasks: lm-eval tasks through the optimum-fair backend instead (`run_tasks`)."""
    if args.tasks:
        return run_tasks(args)
    names = [resolve_model(args.model)] + ([resolve_model(args.compare)] if args.compare else [])
    base = resolve_model(args.base) if args.base else next((n for n in names if not is_quantized(n)), None)
    if base is None:
        print("note: no full-precision model among them and no --base: masked NLL only")
    rows: dict[str, dict] = {}
    traces = None
    if base is not None:
        teacher, tokenizer = load_model(base, args.dtype, args.device, args.kernel)
        metrics, traces = _evaluate(teacher, tokenizer, args, teacher=teacher)
        if base in names:
            rows[base] = metrics
        del teacher
    for name in names:
        if name not in rows:
            model, tokenizer = load_model(name, args.dtype, args.device, args.kernel)
            rows[name] = _evaluate(model, tokenizer, args, traces=traces)
            del model
    rows = {name: rows[name] for name in names}
    print(_table(rows, args.all_metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """lm-eval tasks on one model through the optimum-fair backend: lm-eval's table, its results JSON."""
    if args.compare or args.base:
        raise ValueError("--tasks scores one model: --compare and --base belong to the NLL / stability table")
    try:
        from ..integrations.harness import evaluate_tasks  # lm-eval is optional: imported only here
    except ImportError as err:
        raise ImportError(f"--tasks needs lm-eval ({err}): pip install -e \".[eval]\"") from None
    from lm_eval.utils import make_table, simple_parse_args_string

    from ..eval.tasks import flatten_results

    model_args = {"dtype": args.dtype, "device": args.device, "mc_num": args.mc_num, "batch_size": args.batch_size,
                  **simple_parse_args_string(args.model_args)}
    results = evaluate_tasks(resolve_model(args.model), args.tasks.split(","), include_path=args.include_path,
                             limit=args.limit, output_path=args.output_path, **model_args)
    print(make_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(flatten_results(results), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# -- push / export / generate ----------------------------------------------------------------
def run_push(args: argparse.Namespace) -> int:
    url = push_quantized(args.output_dir, args.repo_id, token=args.token, private=args.private,
                         overwrite=args.overwrite, commit_message=args.commit_message)
    print(f"pushed {url}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = export(args.output_dir, args.output, args.format, overwrite=args.overwrite, gguf_type=args.gguf_type)
    print(f"wrote {out}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(resolve_model(args.model), args.dtype, args.device, args.kernel)
    generator = torch.Generator(device=execution_device(model)).manual_seed(args.seed)
    kwargs = {"generator": generator} if args.temperature > 0 else {}
    print(generate(model, tokenizer, args.prompt, gen_length=args.gen_length, steps=args.steps,
                   block_length=args.block_length, algorithm=args.algorithm, temperature=args.temperature,
                   threshold=args.threshold, factor=args.factor, cache=args.cache, **kwargs))
    return 0
