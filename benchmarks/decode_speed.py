"""Decoding speed of the shipped model the way diffusion LMs are served (issue 34).

In one process and on the same prompts (held-out lee news text), each model decodes 64 tokens in blocks of 32
under four policies: one token per step (today's default), Fast-dLLM's threshold rule, threshold + prefix KV
cache and threshold + dual KV cache. Reported per (model, policy): wall seconds, generated tokens per second,
forward passes per generated token (steps per token), the share of generated tokens equal to the FP32 teacher's
one-per-step output and to the FP32 teacher's under the same commit rule without a cache, and the share of
prompts whose whole answer equals the latter, and the teacher-forced frontier flip rate (all decisions / teacher
margin >= 0.1) on that FP32 same-rule trajectory, read through the row's cache (issue 34's metric). Models: the
FP32 teacher, optionally bf16, and W4A4 / W8A8 (quick RTN + Hadamard calibration, integer kernels). Batch = all
prompts at once. Times: the fastest of ``--repeats`` interleaved runs; ``x_paired``: the speed-up over FP32
one-per-step within each repeat, median [min, max] over the repeats.

    OMP_NUM_THREADS=1 python benchmarks/decode_speed.py --threads 1 --out benchmarks/results/decode_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

QUICK = dict(rounding="rtn", transform="hadamard", weighting="uniform", num_probes=8, num_samples=8)
QUANTIZED = {  # name: FairCalibConfig fields
    "w4a4": dict(w_bits=4, a_bits=4, **QUICK),  # RTN after a Hadamard rotation: the integer-kernel speed model
    "w8a8": dict(w_bits=8, a_bits=8, **QUICK),
    "w4a4-rtn": dict(w_bits=4, a_bits=4, rounding="rtn", transform="none", weighting="uniform", num_probes=8,
                     num_samples=8),
    "w4a4-fair": dict(w_bits=4, a_bits=4, rounding="gptq", transform="hadamard", weighting="fair", num_probes=32,
                      num_samples=32, seed=0),  # FAIR-Calib (prior-weighted GPTQ + rotation), small budget
}


def load_models(names: list[str]) -> tuple[dict, object]:
    """{name: model} for fp32 / bf16 and the `QUANTIZED` names (float32 with integer kernels)."""
    from transformers import AutoModel, AutoTokenizer

    import optimum_fair
    from optimum_fair import FairCalibConfig

    path = optimum_fair.DEFAULT_MODEL
    models = {}
    for name in names:
        if name in ("fp32", "bf16"):
            dtype = torch.float32 if name == "fp32" else torch.bfloat16
            models[name] = AutoModel.from_pretrained(path, dtype=dtype).eval()
        else:
            models[name] = AutoModel.from_pretrained(path, dtype=torch.float32, quantization_config=FairCalibConfig(
                **QUANTIZED[name])).eval()
    return models, AutoTokenizer.from_pretrained(path)


def policies(threshold: float) -> list[tuple[str, dict]]:
    rule = {"threshold": threshold}
    return [("one-per-step", {}), (f"threshold {threshold:g}", rule), (f"threshold {threshold:g} + prefix",
            {**rule, "cache": "prefix"}), (f"threshold {threshold:g} + dual", {**rule, "cache": "dual"})]


@torch.no_grad()
def decode(model, prompts: torch.Tensor, gen_length: int, block_length: int, policy: dict):
    """(trace, wall seconds) of a greedy low-confidence decode under ``policy``."""
    from optimum_fair.modeling.kv_cache import ApproximateCache
    from optimum_fair.scoring.sampler import llada_decode

    kw = dict(policy)
    mode = kw.pop("cache", None)
    cache = None if mode is None else ApproximateCache(model, mode)
    start = time.perf_counter()
    trace = llada_decode(lambda x, attention_mask=None: model(x).logits, prompts, gen_length, block_length,
                         gen_length, model.config.mask_token_id, cache=cache, **kw)
    return trace, time.perf_counter() - start


@torch.no_grad()
def flips(model, fp_trace, policy: dict) -> tuple[float, float]:
    """Teacher-forced frontier flip rate (all decisions, teacher margin >= 0.1) of ``model`` under ``policy``'s
    cache on the FP32 teacher's uncached trajectory with the same rule."""
    from optimum_fair.eval.metrics import frontier_flip_rate
    from optimum_fair.modeling.kv_cache import ApproximateCache

    mode = policy.get("cache")
    cache = None if mode is None else ApproximateCache(model, mode)
    res = frontier_flip_rate(fp_trace, lambda x, attention_mask=None: model(x).logits,
                             rule=(policy.get("threshold"), None), cache=cache)
    return round(res.flip_rate, 3), round(res.flip_rate_confident, 3)


def timed(models: dict, prompts: torch.Tensor, gen_length: int, block_length: int, threshold: float,
          repeats: int) -> dict:
    """{(model, policy label): (trace, [wall seconds of each repeat])}, the cases interleaved per repeat so
    that a busy spell on a shared machine spreads over all of them."""
    out = {}
    for _ in range(repeats):
        for name, model in models.items():
            for label, policy in policies(threshold):
                trace, seconds = decode(model, prompts, gen_length, block_length, policy)
                out[(name, label)] = (trace, out.get((name, label), (None, []))[1] + [seconds])
    return out


def paired_ratio(base: list[float], times: list[float]) -> str:
    """The speed-up over the baseline within each repeat (same moment of the machine): median [min, max]."""
    ratios = sorted(b / t for b, t in zip(base, times, strict=True))
    return f"{statistics.median(ratios):.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}]"


def run(models: dict, prompts: torch.Tensor, gen_length: int, block_length: int, threshold: float,
        repeats: int = 3) -> list[dict]:
    rows, fp = [], {}
    times = timed(models, prompts, gen_length, block_length, threshold, repeats)
    for name, model in models.items():
        for label, policy in policies(threshold):
            trace, each = times[(name, label)]
            seconds = min(each)
            rule_key = label.split(" + ")[0]
            if name == "fp32" and "cache" not in policy:
                fp[rule_key] = trace
            flip_all, flip_m = flips(model, fp[rule_key], policy)
            rows.append(dict(model=name, policy=label, seconds=round(seconds, 3),
                             tokens_per_s=round(trace.generated.numel() / seconds, 1),
                             steps_per_token=round(trace.steps_per_token(), 3), flip_rate=flip_all,
                             flip_rate_m01=flip_m, gen=trace.generated, rule=rule_key, each=each))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("gen", "rule")}), flush=True)
    base = next(r for r in rows if r["model"] == "fp32" and r["policy"] == "one-per-step")
    for r in rows:
        r["x_fp32_one_per_step"] = round(base["seconds"] / r["seconds"], 2)
        r["x_paired"] = paired_ratio(base["each"], r["each"])
    for r in rows:
        gen, same_rule = r.pop("gen"), fp[r.pop("rule")].generated
        r["each"] = [round(t, 3) for t in r["each"]]
        r["agree_fp_one_per_step"] = round(float((gen == fp["one-per-step"].generated).double().mean()), 3)
        r["agree_fp_same_rule"] = round(float((gen == same_rule).double().mean()), 3)
        r["same_text_fp_same_rule"] = round(float((gen == same_rule).all(-1).double().mean()), 3)
    return rows


@torch.no_grad()
def curve(models: dict, prompts: torch.Tensor, gen_length: int, block_length: int, thresholds: list[float],
          factors: list[float]) -> list[dict]:
    """Tokens per step under each threshold / factor (no cache) for every model, the flip rate against the FP32
    teacher under the same rule, and the paired per-prompt difference in steps per token to FP32 (mean and a
    normal 95 % interval over prompts)."""
    rows = []
    rules = [{"threshold": t} for t in thresholds] + [{"factor": f} for f in factors]
    for rule in rules:
        fp_trace = decode(models["fp32"], prompts, gen_length, block_length, rule)[0]
        fp_steps = fp_trace.steps_used().double() / gen_length  # (batch,)
        for name, model in models.items():
            trace = fp_trace if name == "fp32" else decode(model, prompts, gen_length, block_length, rule)[0]
            steps = trace.steps_used().double() / gen_length
            diff = steps - fp_steps
            half = 1.96 * float(diff.std()) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
            flip_all, flip_m = flips(model, fp_trace, rule)
            rows.append(dict(model=name, rule=" ".join(f"{k} {v:g}" for k, v in rule.items()),
                             tokens_per_step=round(1 / float(steps.mean()), 3),
                             steps_per_token=round(float(steps.mean()), 3),
                             diff_vs_fp32=f"{float(diff.mean()):+.3f} [{float(diff.mean()) - half:+.3f}, "
                                          f"{float(diff.mean()) + half:+.3f}]",
                             flip_rate=flip_all, flip_rate_m01=flip_m))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def curve_markdown(rows: list[dict]) -> str:
    cols = ["model", "rule", "tokens_per_step", "steps_per_token", "diff_vs_fp32", "flip_rate", "flip_rate_m01"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def llama_cpp_anchor(llama_dir: Path, models: dict, tok, prompt: torch.Tensor, gen_length: int, block_length: int,
                     threshold: float, work: Path) -> list[dict]:
    """The outside anchor: `llama-diffusion-cli` on the shipped model's W4A16 GGUF (RTN, exported by this package)
    decoding ``gen_length`` tokens after one prompt (its text), ``gen_length`` steps in blocks of ``block_length``,
    greedy, one thread; its own reported time. Beside it, this package on the same single prompt: the FP32
    teacher one-per-step and every speed-table model under threshold + dual cache (fastest of 3)."""
    import os
    import subprocess

    from transformers import AutoModel

    import optimum_fair
    from optimum_fair import FairCalibConfig
    from optimum_fair.export import export

    cfg = FairCalibConfig(w_bits=4, a_bits=16, rounding="rtn", transform="none", weighting="uniform", num_probes=8,
                          num_samples=8)
    w4a16 = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32, quantization_config=cfg)
    gguf = export(w4a16.eval(), work / "w4a16.gguf", "gguf", tokenizer=tok)
    text = tok.decode(prompt[0].tolist(), skip_special_tokens=True)
    args = ["-m", str(gguf), "-p", text, "-n", str(gen_length), "--diffusion-steps", str(gen_length),
            "--diffusion-block-length", str(block_length), "--temp", "0", "--seed", "0", "-t", "1",
            "-c", str(2 * (prompt.shape[1] + gen_length)), "-ub", "256", "-b", "256"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(llama_dir / "bin"))
    times = []
    for _ in range(3):
        done = subprocess.run([str(llama_dir / "bin" / "llama-diffusion-cli"), *args], capture_output=True, text=True,
                              errors="replace", env=env, timeout=600)
        _, found, tail = done.stderr.rpartition("total time:")
        if done.returncode == 0 and found:
            times.append(float(tail.split("ms", 1)[0]) / 1000)
    rows = [dict(engine="llama-diffusion-cli", model="w4a16 (GGUF Q4_0)", policy="one-per-step",
                 seconds=round(min(times), 3) if times else None,
                 tokens_per_s=round(gen_length / min(times), 1) if times else None)]
    cases = [("fp32", "one-per-step", {})] + [(n, f"threshold {threshold:g} + dual", {"threshold": threshold,
                                                                                      "cache": "dual"})
                                               for n in models]
    for name, label, policy in cases:
        best = min(decode(models[name], prompt, gen_length, block_length, policy)[1] for _ in range(3))
        rows.append(dict(engine="optimum-fair", model=name, policy=label, seconds=round(best, 3),
                         tokens_per_s=round(gen_length / best, 1)))
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["model", "policy", "seconds", "tokens_per_s", "x_fp32_one_per_step", "x_paired", "steps_per_token",
            "agree_fp_one_per_step", "agree_fp_same_rule", "same_text_fp_same_rule", "flip_rate", "flip_rate_m01"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    names = ["fp32", "bf16", *QUANTIZED]
    parser.add_argument("--models", nargs="+", default=["fp32", "w4a4"], choices=names, help="the speed table's")
    parser.add_argument("--curve-models", nargs="+", default=["fp32", "w4a4-rtn", "w4a4-fair"], choices=names)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per case; the fastest is reported")
    parser.add_argument("--curve", action="store_true", help="also the tokens-per-step curve over the rules below")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.2])
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--skip-speed", action="store_true", help="only the curve (and the anchor)")
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="a llama.cpp build (with bin/llama-diffusion-cli): also the one-prompt outside anchor")
    parser.add_argument("--out", type=Path, default=None, help="also write rows, args and machine as JSON")
    args = parser.parse_args(argv)
    if "fp32" not in args.models:
        parser.error("--models must include fp32 (the reference)")
    torch.set_num_threads(args.threads)
    from optimum_fair.data import calibration_sequences, load_texts

    models, tok = load_models(list(dict.fromkeys(args.models + (args.curve_models if args.curve else []))))
    prompts = calibration_sequences(load_texts("lee"), tok, args.num_prompts, args.prompt_len, seed=args.seed)
    info = {**machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    speed_models = {k: models[k] for k in args.models}
    curve_models = {k: models[k] for k in ["fp32", *args.curve_models] if k in models}
    rows = [] if args.skip_speed else run(speed_models, prompts, args.gen_length, args.block_length, args.threshold,
                                          args.repeats)
    curve_rows = curve(curve_models, prompts, args.gen_length, args.block_length, args.thresholds, args.factors) \
        if args.curve else []
    anchor = []
    if args.llama_cpp:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            anchor = llama_cpp_anchor(args.llama_cpp, speed_models, tok, prompts[:1], args.gen_length,
                                      args.block_length, args.threshold, Path(work))
    if rows:
        print(markdown(rows))
    if curve_rows:
        print(curve_markdown(curve_rows))
    if args.out:
        shown = vars(args) | {"out": str(args.out), "llama_cpp": str(args.llama_cpp)}
        args.out.write_text(json.dumps({"machine": info, "args": shown,
                                        "rows": rows, "curve": curve_rows, "anchor": anchor}, indent=1) + "\n")


if __name__ == "__main__":
    main()
