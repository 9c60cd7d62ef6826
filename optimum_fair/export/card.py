"""The model card of a quantized model: Hub metadata, config, measured quality, calibration, usage.

`build_card` reads the model's `CalibrationResult` (prior, per-block losses, base model) and its
quantization config; it names the base model by its Hub id, or by its folder name for a local model,
never by a path of this machine.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..config import FairCalibConfig
from ..eval.evaluate import HEADLINE, table
from ..naming import check_repo_id, is_repo_id, public_name, source_name
from ..pipeline.result import PRIOR_DIR, CalibrationResult, calibration_result

REPO_PLACEHOLDER = "<this-repo-id>"  # replaced by the repo id when the folder is pushed
# benchmarks/confirm.py's pre-stated runs (benchmarks/results/confirm_*.json): A - B frontier flip rate, points
EVIDENCE = (
    "## What is known about the prior\n\n"
    "Whether FAIR-Calib's position prior beats uniform token weighting is **not established**. optimum-fair's "
    "pre-stated confirmatory comparisons (W4A4 FlatQuant-style, held-out text, 48 prompts, on its 3.7 M-parameter "
    "test teacher; first one sequence setting x 3 seeds, then two further settings x 3 seeds) found no interval "
    "of the frontier flip-rate difference below zero: nothing favours the prior or decode-like inputs, and the "
    "prior with beta = 3 raised the flip rate in the second run. Each design detects about 1.2-2 points at 80 % "
    "power.\n\n"
    "| comparison (A - B) | flip rate, points [95 % CI], 1 setting | 2 further settings |\n|---|---|---|\n"
    "| prior, beta = 1 - uniform | -0.24 [-1.54, +0.87] | +0.63 [-0.27, +1.52] |\n"
    "| prior, beta = 3 - uniform | +0.85 [-0.46, +2.11] | +1.32 [+0.39, +2.22] |\n"
    "| masked (decode-like) Stage II inputs - text | -0.56 [-1.93, +0.74] | -0.35 [-1.13, +0.48] |\n\n"
    "No test at the paper's scale (a 7-8 B model) has run; the defaults are the paper's (beta = 1, text inputs).\n"
)


def quant_tag(config: Any) -> str:
    """"w4a4", "w4a8", "w8a8", "w4a16" ... from the config's bit widths."""
    return f"w{config.w_bits}a{config.a_bits}"


def hub_base_model(model: Any, base_model: str | None = None, result: CalibrationResult | None = None) -> str | None:
    """The full-precision base model's Hub id: ``base_model``, else the name it was quantized from when
    that is a Hub id and the model was quantized in this process. None when unknown: a local base, or a
    reloaded quantized checkpoint (its name is the quantized repo, not the base)."""
    if base_model:
        return check_repo_id(base_model, "base_model")
    result = result if result is not None else calibration_result(model)
    if result is not None and result.reloaded:
        return None
    name = result.base_model if result is not None else source_name(model)
    return name if is_repo_id(name) else None


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _quality_section(metrics: dict[str, Any]) -> str:
    """metrics: {row name: evaluate() dict} (or one evaluate() dict) -> markdown section."""
    rows = metrics if all(isinstance(v, dict) for v in metrics.values()) else {"quantized": metrics}
    present = [k for k in HEADLINE if any(k in r for r in rows.values())]
    extra = sorted({k for r in rows.values() for k in r if "/" in k and k.split("/", 1)[1] in HEADLINE})
    from ..eval.tasks import is_task_metric  # here, so `python -m optimum_fair.eval.tasks` runs it fresh

    tasks = sorted({k for r in rows.values() for k in r if is_task_metric(k)})
    text = table(rows, columns=present + extra + tasks or None, transpose=True)
    note = (" `task/metric` columns are lm-eval task scores through the optimum-fair backend (Monte-Carlo "
            "masked-diffusion likelihood; `optimum_fair.integrations.harness`)." if tasks else "")
    return ("## Measured quality\n\nMasked-token NLL / accuracy at mask ratio 0.5 on held-out text; frontier flip "
            "rate on the full-precision teacher's greedy trajectories (all decisions, and at teacher margin >= 0.1); "
            "agreement = share of greedy-decoded tokens equal to the teacher's (`optimum_fair.evaluate`)."
            f"{note}\n\n{text}\n")


def _calibration_section(log: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in log for k in r))
    rows = [[f"{r.get(k):.4g}" if isinstance(r.get(k), float) else r.get(k, "-") for k in keys] for r in log]
    return ("## Calibration\n\nPer-block weighted output MSE after calibration (`loss`) and with "
            "round-to-nearest (`loss_rtn`), over the first `samples` calibration samples:\n\n"
            f"{_md_table(keys, rows)}\n")


def _config_section(config: Any) -> str:
    rows = [[k, "-" if v is None else v] for k, v in config.to_dict().items()]
    return f"## Quantization config\n\n{_md_table(['field', 'value'], rows)}\n"


def build_card(model: Any, metrics: dict[str, Any] | None = None, base_model: str | None = None,
               repo_id: str | None = None, result: CalibrationResult | None = None) -> ModelCard:
    """The model card of a quantized ``model``: Hub metadata, config, quality, calibration, usage."""
    config = quant_config(model)
    result = result if result is not None else calibration_result(model)
    base = hub_base_model(model, base_model, result)
    model_type = str(getattr(model.config, "model_type", "model"))
    tags = ["fair-calib", quant_tag(config), "diffusion-lm", model_type.lower(), "optimum-fair"]
    data = ModelCardData(base_model=base, base_model_relation="quantized" if base else None,
                         library_name="transformers", pipeline_tag="text-generation", tags=tags)
    named = result.base_model if result is not None and not result.reloaded else public_name(source_name(model))
    source = base or named or "a full-precision model"
    has_prior = result is not None and result.prior is not None
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
    if result is not None and result.blocks:
        parts.append(_calibration_section(result.blocks))
    if config.weighting == "fair" or config.calib_inputs == "masked":
        parts.append(EVIDENCE)
    if has_prior:
        parts.append(f"## Files\n\n`{PRIOR_DIR}/` holds the Stage I position prior (`prior.safetensors`, "
                     "`prior.json` with its decode settings); reuse it with `FairCalibConfig(prior=...)`. The "
                     "weights carry the same prior (`fair_prior.*` tensors), so "
                     "`optimum_fair.calibration_result(model).prior` holds it after loading.\n")
    parts.append(_usage_section(repo_id or REPO_PLACEHOLDER))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def _usage_section(repo_id: str) -> str:
    return ("## How to load\n\n```python\nimport optimum_fair  # registers fair_calib and the native LLaDA / Dream "
            "classes\nfrom transformers import AutoModel, AutoTokenizer\n\n"
            f'model = AutoModel.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            'print(optimum_fair.generate(model, tokenizer, "The history of", gen_length=64))\n```\n\n'
            f"or `optimum-fair generate {repo_id} \"The history of\"`.\n")


def quant_config(model: Any) -> FairCalibConfig:
    """The model's FairCalibConfig (from model.config.quantization_config); ValueError if it has none."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "fair_calib":
        config = FairCalibConfig.from_dict(config)
    if not isinstance(config, FairCalibConfig):
        raise ValueError(f"{type(model).__name__} is not quantized by optimum-fair "
                         "(model.config.quantization_config is not a FairCalibConfig): run optimum_fair.quantize first")
    return config
