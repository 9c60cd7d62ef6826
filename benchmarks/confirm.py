"""A confirmatory run: ONE comparison, stated before it runs, on text no study has used.

    python benchmarks/confirm.py benchmarks/confirm/beta3_vs_uniform.json
    python benchmarks/confirm.py benchmarks/confirm/*.json --threads 1   # issue 23's three, ~2.5 h
    python benchmarks/confirm.py SPEC.json --quick          # a smoke run: tiny settings, one seed
    python benchmarks/confirm.py benchmarks/confirm/served_prior_vs_uniform.json --threads 1  # issue 34 item 4
    python benchmarks/confirm.py SPEC.json --agreement      # which policy to pre-state (see below)

The spec (a small JSON file, written and committed before the run) names the comparison and its design:

    {"name": "beta3-vs-uniform",
     "hypothesis": "early_boost 3 lowers the W4A4 frontier flip rate against uniform weighting",
     "a": {"weighting": "fair", "early_boost": 3.0}, "b": {"weighting": "uniform"},
     "base": {"w_bits": 4, "a_bits": 4, "rounding": "rtn", "transform": "flatquant"},
     "text": "lee-test", "seeds": [0, 1, 2], "num_prompts": 48, "gen_length": 32,
     "settings": [{"seq_len": 128, "window": 64, "block_length": 32, "num_samples": 64, "num_probes": 128},
                  {"seq_len": 128, "window": 96, "block_length": 32, "num_samples": 64, "num_probes": 128}]}

For every (setting, seed) the FP teacher's greedy trajectories on the spec's text are built once, A and
B are quantized from the teacher with the same calibration sequences, and both are scored on the same
decisions. The result is the paired difference A - B of the frontier flip rate (all decisions and at
teacher margin >= 0.1) with a 95 % bootstrap interval over prompts (the (setting, seed) runs averaged
per prompt), and the smallest difference the design detects with 80 % power at the 5 % level, from the
paired variance across prompts. A setting becomes a default only when its interval excludes zero in its
favour. "lee-test" (`optimum_fair.data`, gensim's lee.cor) was evaluated by no study before this tool.

An optional ``"policy"`` (issue 34: the way the model is served) decodes the FP teacher's trajectories and
evaluates both sides under it: ``{"decode": "threshold", "threshold": 0.9, "cache": "none"}`` with the keys of
`evaluate` (``decode``: schedule / threshold / factor, ``threshold``, ``factor``, ``cache``: none / prefix /
dual; a key left out takes evaluate's default). Without it, today's one-per-step decode. A side that builds
its prior under the policy says so in its own config fields (``"a": {"weighting": "fair", "stage1_policy":
"threshold", "stage1_threshold": 0.9}``). Unknown policy keys and bad values are refused before any work.
``--agreement`` picks that policy before the spec is written: on the spec's text and decode design, the FP
teacher's greedy decode under each point of the tokens-per-step curve (thresholds 0.9-0.2, factors 1-4, no
cache) against its one-per-step decode: steps per token, the share of generated tokens equal (decode_speed.py's
``agree_fp_one_per_step``) and of prompts whose whole answer is equal.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig, quantize
from optimum_fair.arch import get_adapter
from optimum_fair.eval.decoding import make_policy
from optimum_fair.eval.evaluate import build_teacher_traces, evaluate
from optimum_fair.scoring.decoding import DecodePolicy

REQUIRED = ("name", "hypothesis", "a", "b", "base", "text", "seeds", "num_prompts", "gen_length", "settings")
OPTIONAL = ("calib_text", "epochs", "policy")
POLICY_KEYS = ("decode", "threshold", "factor", "cache")  # evaluate()'s / build_teacher_traces()'s arguments
SUMMARY = ("flip_rate", "flip_rate_m0.1", "steps_per_token", "teacher_steps_per_token", "decode_policy")
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5 %, 80 % power


def load_spec(path: str) -> dict:
    """The comparison spec, checked before any work (a missing or unknown key is named)."""
    spec = json.loads(Path(path).read_text())
    missing = [k for k in REQUIRED if k not in spec]
    unknown = sorted(set(spec) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}; expected {list(REQUIRED)} "
                         f"(optional: {list(OPTIONAL)})")
    if not spec["settings"] or not spec["seeds"]:
        raise ValueError(f"{path}: settings and seeds must be non-empty")
    check_policy(spec.get("policy", {}), path)
    for side in ("a", "b"):  # every config the run will build must be valid now, not after an hour
        for setting in spec["settings"]:
            FairCalibConfig(**{**spec["base"], **setting, **spec[side]})
    return spec


def check_policy(policy: dict, where: str = "spec") -> DecodePolicy:
    """The spec's serving policy as a checked `DecodePolicy` (unknown keys and bad values named)."""
    if not isinstance(policy, dict):
        raise ValueError(f"{where}: policy must be an object with keys {list(POLICY_KEYS)}, got {policy!r}")
    unknown = sorted(set(policy) - set(POLICY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown policy keys {unknown}; expected some of {list(POLICY_KEYS)}")
    try:
        return DecodePolicy(policy.get("decode", "schedule"), threshold=policy.get("threshold", 0.9),
                            factor=policy.get("factor", 1.0), cache=policy.get("cache", "none"))
    except ValueError as err:
        raise ValueError(f"{where}: policy {policy}: {err}") from err


def paired_flip_difference(a: list[dict], b: list[dict], text: str, resamples: int = 2000,
                           seed: int = 0) -> dict:
    """A - B frontier flip rates over prompts, pooled over the runs (one dict of evaluate() per run).

    Each run holds per-prompt flip counts (``{text}/flips_per_prompt``, the same prompts and decisions on
    both sides); a prompt's difference is averaged over the runs, the interval resamples prompts.
    Returns diff / ci / mde (points of flip rate) for all decisions and at margin >= 0.1.
    """
    out = {}
    for name, key, per_prompt_decisions in (("all", "flips_per_prompt", None),
                                            ("m0.1", "confident_flips_per_prompt", "confident_per_prompt")):
        d = torch.stack([torch.tensor(ra[f"{text}/{key}"], dtype=torch.float64)
                         - torch.tensor(rb[f"{text}/{key}"], dtype=torch.float64)
                         for ra, rb in zip(a, b, strict=True)])  # (runs, prompts) flip-count differences
        if per_prompt_decisions is None:
            n = torch.full((d.shape[1],), a[0][f"{text}/decisions"] / d.shape[1], dtype=torch.float64)
        else:
            n = torch.tensor(a[0][f"{text}/{per_prompt_decisions}"], dtype=torch.float64)  # (prompts,)
        per_prompt = d.mean(0)  # (prompts,)

        def rate(idx: torch.Tensor, x=per_prompt, n=n) -> torch.Tensor:
            return x[idx].sum() / n[idx].sum().clamp(min=1)

        gen = torch.Generator().manual_seed(seed)
        m = per_prompt.shape[0]
        boot = torch.stack([rate(torch.randint(0, m, (m,), generator=gen)) for _ in range(resamples)])
        se = float((per_prompt / n.mean()).std(unbiased=True)) / math.sqrt(m)  # of the mean rate difference
        out[name] = {"diff": 100 * float(rate(torch.arange(m))), "prompts": m, "runs": d.shape[0],
                     "ci": [100 * float(torch.quantile(boot, 0.025)), 100 * float(torch.quantile(boot, 0.975))],
                     "mde": 100 * (Z_ALPHA + Z_POWER) * se}
    return out


def check_fits(spec: dict, model_path: str) -> None:
    """Every setting's sequence fits the model (checked from its config.json, before any work)."""
    config = AutoConfig.from_pretrained(model_path)
    limit = get_adapter(config).max_length(config)
    for setting in spec["settings"]:
        FairCalibConfig(**{**spec["base"], **setting}).resolved_seq_len(limit)


def run(spec: dict, model_path: str, threads: int, quick: bool) -> dict:
    torch.set_num_threads(threads)
    check_fits(spec, model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    teacher = AutoModel.from_pretrained(model_path).eval()
    policy = dict(spec.get("policy", {}))
    make_policy(teacher, **{**dict(zip(POLICY_KEYS, ("schedule", 0.9, 1.0, "none"), strict=True)), **policy})
    runs_a, runs_b, log = [], [], []
    for setting in spec["settings"]:
        seq_len = setting.get("seq_len", 128)
        decode = {"num_prompts": spec["num_prompts"], "gen_length": spec["gen_length"],
                  "block_length": min(32, spec["gen_length"]), **policy}
        traces = build_teacher_traces(teacher, tok, texts=[spec["text"]], **decode)
        for seed in spec["seeds"]:
            rows = []
            for side in ("a", "b"):
                t0 = time.perf_counter()
                cfg = FairCalibConfig(**{**spec["base"], **setting, **spec[side], "seed": seed,
                                         "dataset": spec.get("calib_text", "wiki"), "tokenizer": tok,
                                         **({"epochs": spec["epochs"]} if "epochs" in spec else {})})
                model = quantize(AutoModel.from_pretrained(model_path).eval(), cfg, tokenizer=tok)
                rows.append(evaluate(model, tok, teacher_traces=traces, texts=[spec["text"]], **decode,
                                     seq_len=min(128, seq_len), post_commit_prompts=0, details=True))
                log.append({"setting": setting, "seed": seed, "side": side, "seconds": time.perf_counter() - t0,
                            **{k: rows[-1][k] for k in SUMMARY if k in rows[-1]}})
            runs_a.append(rows[0])
            runs_b.append(rows[1])
    return {"spec": spec, "quick": quick, "runs": log,
            "result": paired_flip_difference(runs_a, runs_b, spec["text"])}


CURVE = tuple({"decode": "threshold", "threshold": t} for t in (0.9, 0.7, 0.5, 0.3, 0.2)) + tuple(
    {"decode": "factor", "factor": f} for f in (1.0, 2.0, 4.0))  # decode_speed.py --curve's points


def policy_agreement(spec: dict, model_path: str, threads: int, policies=CURVE) -> dict:
    """The FP teacher under each policy against its own one-per-step decode, on the spec's prompts."""
    for policy in policies:  # all checked before the first decode
        check_policy(policy)
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    teacher = AutoModel.from_pretrained(model_path).eval()
    design = {"texts": [spec["text"]], "num_prompts": spec["num_prompts"], "gen_length": spec["gen_length"],
              "block_length": min(32, spec["gen_length"])}
    base = build_teacher_traces(teacher, tok, **design)[spec["text"]]
    rows = []
    for policy in policies:
        trace = build_teacher_traces(teacher, tok, **design, **policy)[spec["text"]]
        equal = trace.generated == base.generated  # (prompts, gen_length)
        rows.append({"policy": policy, "steps_per_token": trace.steps_per_token(),
                     "tokens_per_step": 1 / trace.steps_per_token(), "agree_fp_one_per_step":
                     float(equal.double().mean()), "same_text_fp_one_per_step": float(equal.all(-1).double().mean())})
        print(json.dumps(rows[-1]), flush=True)
    kept = [r for r in rows if r["agree_fp_one_per_step"] >= 0.9]
    pick = min(kept, key=lambda r: r["steps_per_token"])["policy"] if kept else None
    return {"design": {**design, "model": model_path}, "rows": rows, "most_parallel_with_agreement_0.9": pick}


def report(out: dict) -> str:
    spec, res = out["spec"], out["result"]
    lines = [f"confirmatory comparison {spec['name']}: {spec['hypothesis']}",
             f"A = {spec['a']}, B = {spec['b']}, base {spec['base']}, text {spec['text']}, "
             f"policy {check_policy(spec.get('policy', {})).name}"]
    for name, r in res.items():
        lo, hi = r["ci"]
        verdict = "A lower" if hi < 0 else "A higher" if lo > 0 else "not resolved"
        lines.append(f"  flip rate ({name}): A - B = {r['diff']:+.2f} pts [{lo:+.2f}, {hi:+.2f}] "
                     f"({r['runs']} runs x {r['prompts']} prompts; detectable at 80 % power: "
                     f"{r['mde']:.2f} pts) -> {verdict}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", metavar="spec",
                   help="the comparison(s), as JSON files written before the run; each runs on its own")
    p.add_argument("--model", default=optimum_fair.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, tiny settings")
    p.add_argument("--agreement", action="store_true", help="instead of the comparison: the FP teacher's "
                   "agreement with its one-per-step decode under each curve point (to pick the policy)")
    p.add_argument("--out", default=None, help="JSON result file, with one spec only "
                   "(default: benchmarks/results/confirm_<name>.json)")
    args = p.parse_args(argv)
    if args.out and len(args.specs) > 1:
        p.error(f"--out names one file; {len(args.specs)} specs were given")
    specs = [load_spec(path) for path in args.specs]  # every spec checked before the first run
    for spec in specs:
        if args.agreement:
            out = policy_agreement(spec, args.model, args.threads)
            print(f"most parallel with agreement >= 0.9: {out['most_parallel_with_agreement_0.9']}")
            path = Path(args.out or f"benchmarks/results/confirm_{spec['name']}-agreement.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1) + "\n")
            print(f"wrote {path}")
            continue
        if args.quick:
            small = {"seq_len": 64, "window": 32, "block_length": 16, "num_samples": 8, "num_probes": 8}
            spec = {**spec, "seeds": spec["seeds"][:1], "num_prompts": 8, "gen_length": 16, "epochs": 1,
                    "settings": [{**spec["settings"][0], **small}]}
        out = run(spec, args.model, args.threads, args.quick)
        print(report(out))
        path = Path(args.out or f"benchmarks/results/confirm_{spec['name']}{'-quick' if args.quick else ''}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
