"""GPTQ W4A16 through `from_pretrained` on a tiny random Llama: FairCalibConfig vs transformers' GPTQConfig.

Both sides are the one line a user writes, timed around `AutoModelForCausalLM.from_pretrained(path,
quantization_config=...)` (weight loading, calibration, packing), on the same seeded random Llama saved to
a temporary folder (hidden 512, intermediate 1408, 4 layers, 8 heads / 4 KV heads, float32, the 1024-token
vocabulary of `optimum_fair.DEFAULT_MODEL`'s tokenizer, which is saved beside it). The 28 decoder linears
are quantized to int4, symmetric, one scale per output channel (codes [-8, 7], scale max|w| / 7.5 on both
sides; GPTQConfig stores its scales in float16), activations in float, damping 0.01 of the mean Hessian
diagonal, lazy-update block 128, no act-order, batch 4; the LM head and embeddings stay float:

* ours: `FairCalibConfig(rounding="gptq", transform="none", weighting="uniform", w_bits=4, a_bits=16,
  group_size=-1, num_samples=N, seq_len=L, dataset=<ids>, tokenizer=tok, batch_size=4, damp=0.01,
  seed=0, true_sequential=...)`, <ids> a Dataset with an "input_ids" column, one row per "wiki" article,
  tokenized before the timed call (no special tokens) as GPTQConfig's windows are. Inside the call it
  joins them with EOS (`optimum_fair.data.token_stream`) and draws N disjoint L-token windows
  (`calibration_sequences(..., seed=0)`); a pass-through wrapper records them and checks they equal the
  shared ids (`tokenize_and_draw` in the breakdown is this drawing). `ours` runs at
  the default `compute_dtype="auto"` (bfloat16 autocast on a CPU with avx512_bf16), `ours-fp32` at
  `compute_dtype="float32"`.
* GPTQConfig (optimum's GPTQQuantizer on gptqmodel): `GPTQConfig(bits=4, dataset=..., tokenizer=tok,
  group_size=-1, sym=True, desc_act=False, act_group_aware=False, damp_percent=0.01, batch_size=4,
  pad_token_id=tok.pad_token_id, true_sequential=..., modules_in_block_to_quantize=..., backend="torch")`.
  `backend="torch"` (`--gptq-backend`): the default "auto" packs into TorchFusedLinear, whose CPU forward
  raises for one scale per channel ("_weight_int4pack_mm_cpu: expect qGroupSize to be 32, 64, 128 or 256,
  got 512"); TorchLinear runs it (dequantize, then a float32 matmul). `--gptq-data ids`
  (default) gives it the same N windows, pre-tokenized (`[{"input_ids": (1, L), "attention_mask": ones}]`,
  which optimum takes as they are: the same tokens, no tokenization in the call). `--gptq-data text` gives
  it `tok.decode(window)` strings, which optimum tokenizes one by one with `tok(text)` (this tokenizer adds
  no special tokens); the report says how many windows do not re-tokenize to the same ids (then their
  length differs and optimum left-pads the batch). `act_group_aware=False`: its default True raises in
  gptqmodel 7.6 when group_size=-1 ("act_group_aware=True requires group_size > 0").
* Hessian groups: `--true-sequential no` (default, ours' default): every linear's Hessian from one pass of
  the float block (GPTQConfig: `true_sequential=False`). `yes`: group by group, (q, k, v), (o), (gate, up),
  (down), later groups see earlier ones quantized (GPTQConfig: `true_sequential=True` with these groups as
  `modules_in_block_to_quantize`; its own default would quantize each linear after its own block pass).

Remaining differences: GPTQConfig accumulates H in float32 and keeps float16 scales; ours adds each batch's
float32 products in float64 and keeps float32 scales; at the default compute dtype ours' block forwards
run under bfloat16 autocast (the Hessian products stay float32). Ours also scores a logged per-block loss
on 16 samples (`loss_samples`). The ratio "with each side's package import" adds the import a fresh
process pays: `import optimum_fair` (before a user can write FairCalibConfig) and `import optimum.gptq`
(which loads gptqmodel; transformers does it inside `from_pretrained`).

Each side runs in its own fresh subprocess (`--repeats` times, alternating, after `--warmup` untimed runs
of each that also build gptqmodel's JIT pack extension cache), one thread (`--threads`; the env's
OMP/MKL threads, torch's intra/inter-op threads and gptqmodel's GPTQMODEL_CPU_WORKERS /
GPTQMODEL_PACK_THREADS); user+sys CPU time over wall time of the call shows whether anything used more
cores. gptqmodel is imported (`import optimum.gptq`) before the timed call (its import time is reported),
as optimum_fair is. Timers (wrappers, summed per call; nested ones overlap, e.g. Hessian products run inside
decoder-layer forwards) say where each call's time goes. Quality, in the parent, from the dequantized
weights each side hands back swapped into the FP model (each side's own quantized forward is reported too;
GPTQConfig's weights are dequantized before its first forward): on held-out windows
`calibration_sequences("wiki-val", tok, 32, L, seed=1)`, the relative logit error ||logits_q - logits_fp|| /
||logits_fp|| and the next-token NLL; plus the mean relative weight error. The weights are random, so every
NLL sits near ln(1024) = 6.93; the logit and weight errors carry the signal.

GPTQConfig needs gptqmodel and optimum; gptqmodel 7.7 needs torch>=2.14.1, so 7.6.0 (torch>=2.8, pure
Python: its pack kernel is a JIT torch extension built on first use into ~/.cache/gptqmodel) runs in its
own virtualenv::

    python -m venv /tmp/gqvenv
    /tmp/gqvenv/bin/pip install torch==2.13.0
    /tmp/gqvenv/bin/pip install gptqmodel==7.6.0 transformers==5.25.0 optimum==2.3.0 gensim
    /tmp/gqvenv/bin/pip install --no-deps -e .
    OMP_NUM_THREADS=1 /tmp/gqvenv/bin/python benchmarks/transformers_gptq.py --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, machine
from workers import (
    ROOT,
    git_commit,
    logits_with,
    own_logits,
    proc_mem,
    set_threads,
    torch_threads,
    versions,
    weight_error,
)

RESULTS = ROOT / "benchmarks" / "results"
LLAMA = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
MODEL_SEED = 0
BATCH_SIZE, DAMP = 4, 0.01
HELDOUT_SAMPLES, HELDOUT_SEED = 32, 1
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GROUPS = [list(LINEARS[:3]), [LINEARS[3]], list(LINEARS[4:6]), [LINEARS[6]]]
SIDES = ("ours", "ours-fp32", "gptqconfig")
PACKAGES = ("torch", "transformers", "gptqmodel", "optimum", "optimum-fair", "accelerate", "tokenizers")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def linear_names(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(n_layers) for n in LINEARS]


def build_model(path: Path) -> None:
    """The seeded random Llama (float32) and the shipped model's tokenizer, saved to `path`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import optimum_fair

    tok = AutoTokenizer.from_pretrained(optimum_fair.DEFAULT_MODEL)
    config = LlamaConfig(**LLAMA, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(MODEL_SEED)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)


class Timers:
    """Wraps functions (module attribute or class method) in place and sums their wall time per name."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, attr: str, name: str, on_result=None) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1
            if on_result is not None:
                on_result(out)
            return out

        setattr(owner, attr, timed)


def layer_timers() -> Timers:
    """Timers with every Llama decoder-layer forward counted (hooks run inside it)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    timers = Timers()
    timers.wrap(LlamaDecoderLayer, "forward", "decoder_layer_forwards")
    return timers


def timed_load(path: str, config, model_cls) -> tuple:
    """`model_cls.from_pretrained(path, quantization_config=config)` with wall, CPU time and memory."""
    mem_before, cpu0 = proc_mem(), cpu_seconds()
    t0 = time.perf_counter()
    model = model_cls.from_pretrained(path, quantization_config=config)
    wall = time.perf_counter() - t0
    stats = {"wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "mem_before": mem_before, "mem_after": proc_mem()}
    return model.eval(), stats


# -- workers (one fresh process per side and repeat) --------------------------------------------
def worker_ours(data: dict, args, compute_dtype: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    import optimum_fair  # noqa: F401  registers fair_calib (a user imports it for FairCalibConfig)

    import_s = time.perf_counter() - t0
    import optimum_fair.pipeline.calibration as fcalib  # where from_pretrained's calibration looks names up
    import optimum_fair.pipeline.stage2 as fstage2
    import optimum_fair.pipeline.stats as fstats
    from optimum_fair import FairCalibConfig, FairLinear
    from optimum_fair.calib.transforms import CalibLinear
    from optimum_fair.data import load_texts
    from optimum_fair.pipeline.plan import stage_two_settings

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    # tokenized before the timed call, as GPTQConfig's windows are: one row of ids per "wiki" document
    docs = [t for t in load_texts("wiki")["text"] if t.strip()]
    texts = Dataset.from_dict({"input_ids": tok(docs, add_special_tokens=False, verbose=False)["input_ids"]})
    config = FairCalibConfig(w_bits=4, a_bits=16, rounding="gptq", transform="none", weighting="uniform",
                             group_size=-1, num_samples=args.num_samples, seq_len=args.seq_len, dataset=texts,
                             tokenizer=tok, batch_size=BATCH_SIZE, damp=DAMP, act_order=False, seed=0,
                             true_sequential=args.true_sequential == "yes", compute_dtype=compute_dtype)
    drawn, timers = [], layer_timers()
    timers.wrap(fcalib, "calibration_sequences", "tokenize_and_draw", on_result=lambda ids: drawn.append(ids.clone()))
    timers.wrap(fcalib, "capture_block_inputs", "capture_block0_inputs")
    timers.wrap(fcalib, "calibrate_blocks", "stage2_blocks")
    timers.wrap(fstats, "hessian_sum", "hessian_products")  # inside the layer forwards (a pre-hook)
    timers.wrap(fstage2, "gptq_factor", "gptq_factor")
    timers.wrap(CalibLinear, "export", "gptq_columns_and_pack")
    model, stats = timed_load(args.model_dir, config, AutoModelForCausalLM)
    spent, calls = dict(timers.total), dict(timers.calls)  # the call only, not the forwards below
    if len(drawn) != 1 or not torch.equal(drawn[0], data["calib_ids"]):
        raise RuntimeError("the calibration windows drawn inside from_pretrained differ from the shared ids")
    fair = {n: m for n, m in model.named_modules() if isinstance(m, FairLinear)}
    check_names(fair, model)
    weights = {n: m.dequantized_weight().float().clone() for n, m in fair.items()}
    return {**stats, "side": "ours", "ids_match": True, "timers": spent, "calls": calls, "import_s": import_s,
            "stage2_compute_dtype": str(stage_two_settings(config, torch.device("cpu")).compute_dtype),
            "weights": weights, "logits": own_logits(model, data["heldout_ids"]),
            "threads": torch.get_num_threads(), "head_is_float": type(model.lm_head) is torch.nn.Linear}


def gptq_dataset(ids, tok, mode: str) -> tuple[list, int]:
    """GPTQConfig's dataset for the shared windows, and how many do not re-tokenize to the same ids."""
    import torch

    if mode == "ids":
        return [{"input_ids": w[None].clone(), "attention_mask": torch.ones_like(w)[None]} for w in ids], 0
    texts = [tok.decode(w) for w in ids]
    differ = sum(not torch.equal(torch.tensor(tok(t)["input_ids"]), w) for t, w in zip(texts, ids, strict=True))
    return texts, differ


def gptq_timers():
    from gptqmodel.quantization.gptq import GPTQ
    from optimum.gptq import GPTQQuantizer

    timers = layer_timers()
    timers.wrap(GPTQQuantizer, "quantize_model", "quantize_model")
    timers.wrap(GPTQQuantizer, "pack_model", "pack_model")
    timers.wrap(GPTQQuantizer, "post_init_model", "post_init_model")
    timers.wrap(GPTQ, "add_batch", "gptq_add_batch")
    timers.wrap(GPTQ, "hf_quantize", "gptq_hf_quantize")
    return timers


def worker_gptq(data: dict, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    t0 = time.perf_counter()
    import optimum.gptq  # noqa: F401  imports gptqmodel, as from_pretrained would inside the call

    import_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    dataset, differ = gptq_dataset(data["calib_ids"], tok, args.gptq_data)
    seq = args.true_sequential == "yes"
    config = GPTQConfig(bits=4, dataset=dataset, tokenizer=tok, group_size=-1, sym=True, desc_act=False,
                        act_group_aware=False, damp_percent=DAMP, batch_size=BATCH_SIZE,
                        pad_token_id=tok.pad_token_id, true_sequential=seq,
                        modules_in_block_to_quantize=GROUPS if seq else None, backend=args.gptq_backend)
    timers = gptq_timers()
    model, stats = timed_load(args.model_dir, config, AutoModelForCausalLM)
    spent, calls = dict(timers.total), dict(timers.calls)  # the call only, not the forwards below
    torch_threads(args.threads)  # in case gptqmodel changed it (recorded below)
    quant = {n: m for n, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "dequantize_weight")}
    check_names(quant, model)
    # before any forward (the first CPU forward repacks qweight): dequantize_weight() is (in, out)
    weights = {n: m.dequantize_weight().t().float().clone() for n, m in quant.items()}
    kernels = sorted({type(m).__name__ for m in quant.values()})
    return {**stats, "side": "gptqconfig", "ids_match": args.gptq_data == "ids", "retokenize_differ": differ,
            "import_s": import_s, "timers": spent, "calls": calls, "kernels": kernels,
            "weights": weights, "logits": own_logits(model, data["heldout_ids"]),
            "threads": torch.get_num_threads(), "head_is_float": type(model.lm_head) is torch.nn.Linear}


def check_names(found: dict, model) -> None:
    expected = linear_names(model.config.num_hidden_layers)
    if sorted(found) != sorted(expected):
        raise RuntimeError(f"unexpected quantized modules: {sorted(found)}")


def run_worker(args) -> None:
    import torch

    torch_threads(args.threads)
    data = torch.load(args.data)
    if args.worker == "gptqconfig":
        result = worker_gptq(data, args)
    else:
        result = worker_ours(data, args, "float32" if args.worker == "ours-fp32" else "auto")
    torch.save(result, args.worker_out)


# -- parent ---------------------------------------------------------------------------------------
def git_dirty() -> list[str]:
    """Tracked files of the package with uncommitted changes (the run used them)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "optimum_fair"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line[3:] for line in out.splitlines()]


def spawn(side: str, data_path: Path, out_path: Path, args) -> dict:
    import torch

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--data", str(data_path),
           "--worker-out", str(out_path), "--num-samples", str(args.num_samples), "--threads", str(args.threads),
           "--seq-len", str(args.seq_len), "--model-dir", args.model_dir, "--gptq-data", args.gptq_data,
           "--true-sequential", args.true_sequential, "--gptq-backend", args.gptq_backend]
    log = out_path.with_suffix(".log")
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT), check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {side} failed with code {proc.returncode}:\n{log.read_text()[-4000:]}")
    return torch.load(out_path)


def logit_metrics(logits, fp_logits, ids) -> dict:
    import torch.nn.functional as F

    rel = float((logits - fp_logits).norm() / fp_logits.norm())
    nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    return {"rel_logit_err": rel, "nll": nll}


def rtn_weights(fp: dict) -> dict:
    """Round-to-nearest per channel on the shared grid (scale max|w| / 7.5, codes [-8, 7]), no data."""
    import torch

    out = {}
    for name, w in fp.items():
        s = w.abs().amax(dim=1, keepdim=True) / 7.5
        out[name] = torch.round(w / s).clamp(-8, 7) * s
    return out


def codes_on_grid(weights: dict, fp: dict) -> dict:
    """Codes round(W_q / (max|w| / 7.5)) per linear (both sides' grid; GPTQConfig's float16 scales round)."""
    import torch

    return {n: torch.round(weights[n] / (fp[n].abs().amax(1, keepdim=True) / 7.5)) for n in fp}


def side_summary(runs: list[dict], ref: dict) -> dict:
    """Timing medians / minima over the repeats and quality of the first repeat's weights."""
    walls = [r["wall_s"] for r in runs]
    first = runs[0]
    swapped = logits_with(ref["model"], first["weights"], ref["held"])
    entry = {
        "wall_s": walls, "wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
        "cpu_over_wall_median": statistics.median(r["cpu_s"] / r["wall_s"] for r in runs),
        "peak_rss_gib_median": statistics.median(r["mem_after"]["VmHWM"] for r in runs),
        "rss_before_gib_median": statistics.median(r["mem_before"]["VmRSS"] for r in runs),
        "timers_median_s": {k: statistics.median(r["timers"].get(k, 0.0) for r in runs) for k in first["timers"]},
        "timer_calls": first["calls"],
        "threads_in_worker": sorted({r["threads"] for r in runs}),
        "ids_match": all(r["ids_match"] for r in runs), "head_is_float": all(r["head_is_float"] for r in runs),
        "max_weight_diff_across_repeats": max((float((r["weights"][k] - first["weights"][k]).abs().max())
                                               for r in runs[1:] for k in first["weights"]), default=0.0),
        **logit_metrics(swapped, ref["fp_logits"], ref["held"]),
        "own_forward": logit_metrics(first["logits"], ref["fp_logits"], ref["held"]),
        **weight_error(first["weights"], ref["fp_w"]),
    }
    for key in ("import_s", "retokenize_differ", "kernels", "stage2_compute_dtype"):
        if key in first:
            entry[key] = first[key]
    return entry


def reference(args, tok, texts) -> dict:
    """FP model, shared calibration ids, held-out ids and FP logits / weights."""
    from transformers import AutoModelForCausalLM

    from optimum_fair.data import calibration_sequences

    model = AutoModelForCausalLM.from_pretrained(args.model_dir).float().eval()
    held = calibration_sequences("wiki-val", tok, HELDOUT_SAMPLES, args.seq_len, seed=HELDOUT_SEED)
    fp_w = {n: model.get_submodule(n).weight.detach().float().clone()
            for n in linear_names(model.config.num_hidden_layers)}
    return {"model": model, "held": held, "fp_w": fp_w, "fp_logits": own_logits(model, held),
            "calib_ids": calibration_sequences(texts, tok, args.num_samples, args.seq_len, seed=0)}


def run_sides(args, ref: dict, tmp: Path) -> tuple[dict, dict]:
    import torch

    data_path = tmp / "data.pt"
    torch.save({"calib_ids": ref["calib_ids"], "heldout_ids": ref["held"]}, data_path)
    warm = {}
    for w in range(args.warmup):
        for side in args.sides:
            print(f"warm-up {w + 1}/{args.warmup}: {side} ...", flush=True)
            res = spawn(side, data_path, tmp / f"warm_{side}_{w}.pt", args)
            warm.setdefault(side, []).append(res["wall_s"])
            print(f"   wall {res['wall_s']:.2f} s (untimed)", flush=True)
    results: dict = {side: [] for side in args.sides}
    for r in range(args.repeats):
        for side in args.sides:
            print(f"repeat {r + 1}/{args.repeats}: {side} ...", flush=True)
            res = spawn(side, data_path, tmp / f"{side}_{r}.pt", args)
            print(f"   wall {res['wall_s']:.2f} s, cpu/wall {res['cpu_s'] / res['wall_s']:.2f}, "
                  f"peak RSS {res['mem_after']['VmHWM']:.3f} GiB", flush=True)
            results[side].append(res)
    return results, warm


def compare(results: dict, summary: dict, fp_w: dict) -> dict:
    """Ratios ours / GPTQConfig and code agreement, for each of our sides present."""
    out = {}
    theirs = summary["gptqconfig"]
    their_codes = codes_on_grid(results["gptqconfig"][0]["weights"], fp_w)
    for side in ("ours", "ours-fp32"):
        if side not in summary:
            continue
        ours = summary[side]
        tok_s = ours["timers_median_s"].get("tokenize_and_draw", 0.0)
        codes = codes_on_grid(results[side][0]["weights"], fp_w)
        out[side] = {
            "ratio_median": ours["wall_s_median"] / theirs["wall_s_median"],
            "ratio_min": ours["wall_s_min"] / theirs["wall_s_min"],
            "ratio_median_without_tokenize": (ours["wall_s_median"] - tok_s) / theirs["wall_s_median"],
            "ratio_median_with_imports": ((ours["wall_s_median"] + ours["import_s"])
                                          / (theirs["wall_s_median"] + theirs["import_s"])),
            "ratio_peak_rss": ours["peak_rss_gib_median"] / theirs["peak_rss_gib_median"],
            "frac_codes_differing": statistics.fmean(float((codes[k] != their_codes[k]).float().mean())
                                                     for k in fp_w),
            "linears_lower_weight_err": sum(ours["per_linear_rel_weight_err"][k]
                                            < theirs["per_linear_rel_weight_err"][k] for k in fp_w),
        }
    return out


def run_parent(args) -> None:
    torch_threads(args.threads)
    from transformers import AutoTokenizer

    from optimum_fair.data import load_texts

    if "gptqconfig" not in args.sides:
        raise SystemExit("--sides must include gptqconfig (the ratios are against it)")
    started, args.commit_at_start = _dt.datetime.now(_dt.timezone.utc), git_commit()
    with tempfile.TemporaryDirectory(prefix="tfgptq_") as tmp:
        tmp = Path(tmp)
        if args.model_dir is None:
            args.model_dir = str(tmp / "tiny-llama")
            build_model(Path(args.model_dir))
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        ref = reference(args, tok, load_texts("wiki"))
        results, warm = run_sides(args, ref, tmp)
        summary = {side: side_summary(runs, ref) for side, runs in results.items()}
        rtn = rtn_weights(ref["fp_w"])
        report = make_report(args, started, ref, summary, warm)
        report["rtn"] = {**logit_metrics(logits_with(ref["model"], rtn, ref["held"]), ref["fp_logits"], ref["held"]),
                         "mean_rel_weight_err": weight_error(rtn, ref["fp_w"])["mean_rel_weight_err"]}
        report["comparison"] = compare(results, summary, ref["fp_w"])
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def make_report(args, started, ref, summary, warm) -> dict:
    from optimum_fair.digests import tensor_digest

    model = ref["model"]
    return {
        "benchmark": "from_pretrained GPTQ W4A16 per channel: FairCalibConfig vs transformers GPTQConfig",
        "date_utc": started.isoformat(timespec="seconds"),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "git_commit_at_start": args.commit_at_start, "git_dirty": git_dirty(),
        "versions": versions(PACKAGES), "machine": machine(), "cpu": cpu_name(),
        "threads": args.threads, "loadavg_at_end": list(os.getloadavg()),
        "model": {"llama_config": LLAMA, "vocab_size": model.config.vocab_size, "seed": MODEL_SEED,
                  "n_params": sum(p.numel() for p in model.parameters()), "quantized_linears": len(ref["fp_w"])},
        "settings": {"w_bits": 4, "a_bits": 16, "sym": True, "group_size": -1, "damp": DAMP, "batch_size": BATCH_SIZE,
                     "num_samples": args.num_samples, "seq_len": args.seq_len, "repeats": args.repeats,
                     "warmup": args.warmup, "true_sequential": args.true_sequential, "gptq_data": args.gptq_data,
                     "gptq_backend": args.gptq_backend,
                     "calib_data": f"calibration_sequences('wiki', tok, {args.num_samples}, {args.seq_len}, seed=0)",
                     "calib_ids_digest": tensor_digest(ref["calib_ids"])},
        "heldout": {"data": f"calibration_sequences('wiki-val', tok, {HELDOUT_SAMPLES}, {args.seq_len}, "
                            f"seed={HELDOUT_SEED})", "ids_digest": tensor_digest(ref["held"])},
        "fp": logit_metrics(ref["fp_logits"], ref["fp_logits"], ref["held"]),
        "warmup_wall_s": warm,
        "sides": summary,
    }


LABELS = {"ours": "FairCalibConfig (compute_dtype auto)", "ours-fp32": "FairCalibConfig (compute_dtype float32)",
          "gptqconfig": "GPTQConfig (optimum + gptqmodel)"}


def markdown(report: dict) -> str:
    v, s = report["versions"], report["settings"]
    lines = [
        "# from_pretrained GPTQ W4A16 (per channel, symmetric): FairCalibConfig vs GPTQConfig",
        "",
        (f"Tiny random Llama ({report['model']['n_params'] / 1e6:.2f} M params, float32), 28 linears; "
         f"{s['calib_data']}, batch {s['batch_size']}, damp {s['damp']}, true_sequential {s['true_sequential']}, "
         f"GPTQConfig data: {s['gptq_data']}, backend {s['gptq_backend']}. CPU {report['cpu']}, "
         f"{report['threads']} thread; "
         f"min / median of {s['repeats']} fresh processes per side after {s['warmup']} warm-up."),
        "",
        (f"torch {v['torch']}, transformers {v['transformers']}, gptqmodel {v['gptqmodel']}, optimum {v['optimum']}, "
         f"optimum-fair {v['optimum-fair']} (commit {str(report['git_commit'])[:7]}"
         f"{', uncommitted: ' + ', '.join(report['git_dirty']) if report['git_dirty'] else ''}), "
         f"{report['date_utc']}."),
        "",
        ("| method | from_pretrained min (s) | median (s) | ratio ours/GPTQConfig (median; min) | cpu/wall "
         "| peak RSS (GiB) | rel. logit err | NLL | mean rel. W err | own-forward logit err |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, e in report["sides"].items():
        c = report["comparison"].get(side)
        ratio = (f"{c['ratio_median']:.2f}; {c['ratio_min']:.2f} ({c['ratio_median_with_imports']:.2f} with "
                 "each side's package import)") if c else "1"
        lines.append(f"| {LABELS[side]} | {e['wall_s_min']:.2f} | {e['wall_s_median']:.2f} | {ratio} "
                     f"| {e['cpu_over_wall_median']:.2f} | {e['peak_rss_gib_median']:.3f} | {e['rel_logit_err']:.4f} "
                     f"| {e['nll']:.4f} | {e['mean_rel_weight_err']:.4f} | {e['own_forward']['rel_logit_err']:.4f} |")
    lines += [f"| FP (reference) | - | - | - | - | - | 0 | {report['fp']['nll']:.4f} | 0 | - |",
              (f"| RTN, max\\|w\\|/7.5 (no data) | - | - | - | - | - | {report['rtn']['rel_logit_err']:.4f} "
               f"| {report['rtn']['nll']:.4f} | {report['rtn']['mean_rel_weight_err']:.4f} | - |"), ""]
    lines += breakdown_lines(report)
    return "\n".join(lines)


def breakdown_lines(report: dict) -> list[str]:
    lines = ["Where the time goes (medians, s):"]
    for side, e in report["sides"].items():
        parts = ", ".join(f"{k} {t:.2f}" for k, t in e["timers_median_s"].items())
        package = "optimum_fair" if side.startswith("ours") else "optimum.gptq (gptqmodel)"
        extra = f"; import {package} before the call {e['import_s']:.2f}" if "import_s" in e else ""
        extra += f"; stage II computes in {e['stage2_compute_dtype']}" if "stage2_compute_dtype" in e else ""
        extra += f"; kernels {e['kernels']}" if "kernels" in e else ""
        lines.append(f"- {side}: call {e['wall_s_median']:.2f} = {parts}{extra}")
    for side, c in report["comparison"].items():
        lines.append(f"- {side} vs GPTQConfig: {c['frac_codes_differing']:.3f} of codes differ; ours lower W err on "
                     f"{c['linears_lower_weight_err']}/28 linears; peak RSS ratio {c['ratio_peak_rss']:.2f}")
    g = report["sides"]["gptqconfig"]
    lines.append(f"- same calibration ids: ours {report['sides'].get('ours', {}).get('ids_match')}, GPTQConfig "
                 f"{g['ids_match']} (windows that re-tokenize differently: {g.get('retokenize_differ', 0)}); "
                 f"warm-up walls {report['warmup_wall_s']}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each side first")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--true-sequential", choices=("yes", "no"), default="no")
    parser.add_argument("--gptq-data", choices=("ids", "text"), default="ids",
                        help="GPTQConfig's dataset: the shared windows pre-tokenized, or decoded to text")
    parser.add_argument("--gptq-backend", default="torch",
                        help="GPTQConfig(backend=...): the default 'auto' picks TorchFusedLinear on CPU, whose forward "
                             "fails for per-channel scales (int4pack needs group size 32-256)")
    parser.add_argument("--model-dir", help="an existing model folder (default: build the tiny Llama)")
    parser.add_argument("--out-json", default=str(RESULTS / "transformers_gptq.json"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads, extra=("GPTQMODEL_CPU_WORKERS", "GPTQMODEL_PACK_THREADS"))
    if args.worker:
        run_worker(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
