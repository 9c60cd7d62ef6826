"""GPTQ W4A16 on the shipped LLaDA: optimum-fair's `quantize` vs llm-compressor's `oneshot`.

Both sides quantize the 28 decoder-block linears of `optimum_fair.DEFAULT_MODEL` (the output head
`model.transformer.ff_out` stays in float) to int4, symmetric, one scale per output channel, activations
in float, GPTQ with damping 0.01 of the mean Hessian diagonal, lazy-update block size 128, no act-order,
on the same calibration token windows `calibration_sequences("wiki", tok, N, 128, seed=0)`, batch size 4:

* ours: `optimum_fair.quantize(model, FairCalibConfig(rounding="gptq", transform="none",
  weighting="uniform", w_bits=4, a_bits=16, ..., compute_dtype=...), texts=<ids>, tokenizer=tok)`, where
  <ids> is a Dataset with an "input_ids" column, one row per "wiki" document, tokenized before the timed
  call (as llm-compressor's ids are). `quantize` draws its windows from it with the same seed; a
  pass-through wrapper around `optimum_fair.data.calibration_sequences` records the ids it draws (and the
  time it takes), which must equal the ids given to llm-compressor. Two timed sides: `compute_dtype="auto"`
  (the blocks' forwards in bfloat16 on a CPU with avx512_bf16 / AMX, float32 elsewhere) and "float32".
* llm-compressor: `oneshot(model=..., dataset=Dataset({"input_ids": ids}), recipe=GPTQModifier(
  config_groups={int4 symmetric, strategy "channel"}, ignore=["model.transformer.ff_out"], actorder=None,
  dampening_frac=0.01, block_size=128), pipeline="sequential", sequential_targets=["LLaDABlock"],
  shuffle_calibration_samples=False, batch_size=4)`.

Each side runs in its own fresh subprocess (`--repeats` times, alternating), so that its peak RSS
(`VmHWM` of /proc/self/status, read right after the calibration call) is its own. The wall time is the
calibration call only (model, tokenizer and token ids ready).

Quality (computed in the parent from the dequantized weights each side hands back, swapped into a copy
of the FP model; each side's own quantized model gives the same logits, checked):
held-out windows `calibration_sequences("wiki-val", tok, 32, 128, seed=1)` with 50 % of the positions
of every row (chosen with a fixed seed) replaced by the mask token (id 3): relative logit error
||logits_q - logits_fp|| / ||logits_fp|| over all positions, and the mean NLL of the original tokens at
the masked positions; plus the relative weight error ||W_q - W||_F / ||W||_F averaged over the 28
linears. Two round-to-nearest references are added (no calibration): on the full grid both sides use
(scale = max|w| / 7.5, codes in [-8, 7]: ours since format version 2, compressed-tensors' min-max
observer) and on version 1's symmetric grid (max|w| / 7). Per linear the fraction of our codes that
differ from llm-compressor's is reported. A diagnostic run (one process per N, quality only;
`--no-diagnostic` skips it) repeats ours with `weight_grid="symmetric"`, to show what the grid alone does.

llm-compressor pins transformers<=5.17, so this runs in a separate virtualenv (see the commands in
benchmarks/results/llmcompressor_gptq.md); llm-compressor is not a dependency of optimum-fair.

Usage::

    /tmp/lcvenv/bin/python benchmarks/llmcompressor_gptq.py --num-samples 128 32 --repeats 3
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

from machine import cpu_name
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
SEQ_LEN = 128
BATCH_SIZE = 4
DAMP = 0.01
GPTQ_BLOCK = 128
HELDOUT_SAMPLES, HELDOUT_SEED = 32, 1
MASK_FRACTION, MASK_SEED = 0.5, 1234
HEAD = "model.transformer.ff_out"
LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
SIDES_OURS = ("ours", "ours-fp32", "ours-v1grid")  # compute_dtype "auto" / "float32"; the grid diagnostic
TIMED = ("ours", "ours-fp32", "llmcompressor")
PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "optimum-fair", "accelerate", "datasets")


def load_fp(path: str):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path).float().eval()
    return model, AutoTokenizer.from_pretrained(path)


def block_linear_names(n_blocks: int) -> list[str]:
    return [f"model.transformer.blocks.{b}.{n}" for b in range(n_blocks) for n in LINEARS]


# -- workers (one fresh process per side and repeat) --------------------------------------------
def worker_ours(data: dict, num_samples: int, weight_grid: str = "full", true_sequential: bool = True,
                compute_dtype: str = "auto") -> dict:
    import torch
    from datasets import Dataset

    import optimum_fair
    import optimum_fair.data as fdata
    import optimum_fair.pipeline.calibration as fcalib  # where quantize looks the function up
    from optimum_fair import FairCalibConfig, FairLinear, quantize

    model, tok = load_fp(optimum_fair.DEFAULT_MODEL)
    head_before = model.get_submodule(HEAD).weight.detach().clone()
    # tokenized before the timed call, as llm-compressor's ids are: one row of ids per "wiki" document
    start = time.perf_counter()
    docs = [t for t in fdata.load_texts("wiki")["text"] if t.strip()]
    texts = Dataset.from_dict({"input_ids": tok(docs, add_special_tokens=False, verbose=False)["input_ids"]})
    pretokenize_s = time.perf_counter() - start
    config = FairCalibConfig(w_bits=4, a_bits=16, rounding="gptq", transform="none", weighting="uniform",
                             group_size=-1, num_samples=num_samples, seq_len=SEQ_LEN, dataset="wiki",
                             batch_size=BATCH_SIZE, damp=DAMP, act_order=False, seed=0,
                             true_sequential=true_sequential, weight_grid=weight_grid, compute_dtype=compute_dtype)
    drawn: list = []
    original = fcalib.calibration_sequences

    def recording(*args, **kwargs):  # pass-through: record what quantize draws and how long it takes
        t0 = time.perf_counter()
        ids = original(*args, **kwargs)
        drawn.append((ids.clone(), time.perf_counter() - t0, proc_mem()))
        return ids

    fcalib.calibration_sequences = recording
    mem_before = proc_mem()
    t0 = time.perf_counter()
    quantize(model, config, texts=texts, tokenizer=tok)
    wall = time.perf_counter() - t0
    mem_after = proc_mem()
    fcalib.calibration_sequences = original
    if len(drawn) != 1:
        raise RuntimeError(f"quantize drew calibration windows {len(drawn)} times, expected once")
    ids_match = bool(torch.equal(drawn[0][0], data["calib_ids"]))
    if not ids_match:
        raise RuntimeError("quantize's calibration windows differ from the shared ids")
    fair = {n: m for n, m in model.named_modules() if isinstance(m, FairLinear)}
    expected = block_linear_names(len(model.model.transformer.blocks))
    if sorted(fair) != sorted(expected):
        raise RuntimeError(f"unexpected FairLinears: {sorted(fair)}")
    head = model.get_submodule(HEAD)
    head_untouched = type(head) is torch.nn.Linear and bool(torch.equal(head.weight, head_before))
    weights = {n: m.dequantized_weight().float().clone() for n, m in fair.items()}
    codes_range = [min(int(m.codes().min()) for m in fair.values()), max(int(m.codes().max()) for m in fair.values())]
    logits = own_logits(model, data["heldout_input"])
    return {"side": "ours", "wall_s": wall, "tokenize_s": drawn[0][1], "mem_after_tokenize": drawn[0][2],
            "pretokenize_s": pretokenize_s, "compute_dtype": str(_resolved(compute_dtype)),
            "ids_match": ids_match, "mem_before": mem_before, "mem_after": mem_after,
            "head_untouched": head_untouched, "codes_range": codes_range, "weights": weights, "logits": logits,
            "threads": torch.get_num_threads(),
            "pipeline": f"optimum_fair.quantize (weight_grid={weight_grid}, compute_dtype={compute_dtype})"}


def _resolved(compute_dtype: str):
    import torch

    from optimum_fair.devices import resolve_compute_dtype

    return resolve_compute_dtype(compute_dtype, torch.device("cpu"))


def worker_llmc(data: dict, num_samples: int, pipeline: str) -> dict:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    import optimum_fair

    model, tok = load_fp(optimum_fair.DEFAULT_MODEL)
    head_before = model.get_submodule(HEAD).weight.detach().clone()
    ids = data["calib_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="channel", actorder=None))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=[HEAD], actorder=None,
                          dampening_frac=DAMP, block_size=GPTQ_BLOCK)
    mem_before = proc_mem()
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=dataset, recipe=recipe, num_calibration_samples=num_samples,
            max_seq_length=SEQ_LEN, batch_size=BATCH_SIZE, shuffle_calibration_samples=False,
            pipeline=pipeline, sequential_targets=["LLaDABlock"])
    wall = time.perf_counter() - t0
    mem_after = proc_mem()
    torch_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case oneshot changed it (recorded below)
    quantized = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    expected = block_linear_names(len(model.model.transformer.blocks))
    if sorted(quantized) != sorted(expected):
        raise RuntimeError(f"unexpected quantized modules: {sorted(quantized)}")
    head = model.get_submodule(HEAD)
    head_untouched = getattr(head, "quantization_scheme", None) is None and bool(torch.equal(head.weight, head_before))
    weights, grid_dev, lo, hi = {}, 0.0, 0, 0
    for name, m in quantized.items():
        # In memory after oneshot: `weight` holds the fake-quantized float weight, `weight_scale` (out, 1),
        # `weight_zero_point` (out, 1) zeros. Codes = round(weight / scale); W_q = codes * scale.
        w = m.weight.detach().float()
        scale = m.weight_scale.detach().float()
        if bool((m.weight_zero_point != 0).any()):
            raise RuntimeError(f"{name}: non-zero zero point")
        codes = torch.round(w / scale)
        grid_dev = max(grid_dev, float((w / scale - codes).abs().max()))
        lo, hi = min(lo, int(codes.min())), max(hi, int(codes.max()))
        weights[name] = (codes * scale).clone()
    logits = own_logits(model, data["heldout_input"])
    return {"side": "llmcompressor", "wall_s": wall, "tokenize_s": 0.0, "ids_match": True,
            "mem_before": mem_before, "mem_after": mem_after, "head_untouched": head_untouched,
            "codes_range": [lo, hi], "max_off_grid": grid_dev, "weights": weights, "logits": logits,
            "threads": torch.get_num_threads(), "pipeline": pipeline}


def run_worker(args) -> None:
    import torch

    torch_threads(args.threads)
    data = torch.load(args.data)
    if args.worker in SIDES_OURS:
        result = worker_ours(data, args.worker_samples, "symmetric" if args.worker == "ours-v1grid" else "full",
                             true_sequential=args.true_sequential == "yes",
                             compute_dtype="float32" if args.worker == "ours-fp32" else "auto")
    else:
        result = worker_llmc(data, args.worker_samples, args.pipeline)
    torch.save(result, args.worker_out)


# -- parent ---------------------------------------------------------------------------------------
def masked_heldout(tok, mask_id: int):
    """(32, 128) held-out windows, the same with 50 % of each row's positions masked, and the mask."""
    import torch

    from optimum_fair.data import calibration_sequences

    ids = calibration_sequences("wiki-val", tok, HELDOUT_SAMPLES, SEQ_LEN, seed=HELDOUT_SEED)
    gen = torch.Generator().manual_seed(MASK_SEED)
    n_mask = round(MASK_FRACTION * SEQ_LEN)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(ids.shape[0]):
        mask[row, torch.randperm(SEQ_LEN, generator=gen)[:n_mask]] = True
    return ids, ids.masked_fill(mask, mask_id), mask


def logit_metrics(logits, fp_logits, ids, mask) -> dict:
    import torch.nn.functional as F

    rel = float((logits - fp_logits).norm() / fp_logits.norm())
    nll = float(F.cross_entropy(logits[mask], ids[mask]))
    return {"rel_logit_err": rel, "masked_nll": nll}


def rtn_references(fp: dict) -> dict:
    """Round-to-nearest (no data) per channel on the full grid max|w|/7.5 (both sides) and on version 1's max|w|/7."""
    import torch

    from optimum_fair.ops import dequantize_weight, quantize_weight, weight_scale

    ours, ct = {}, {}
    for name, w in fp.items():
        scale = weight_scale(w, 4, grid="symmetric")  # (out, 1) = max|w| / 7
        ours[name] = dequantize_weight(quantize_weight(w, scale, 4), scale)
        s75 = w.abs().amax(dim=1, keepdim=True) / 7.5  # compressed-tensors: max|w| / ((7 - (-8)) / 2)
        ct[name] = torch.round(w / s75).clamp(-8, 7) * s75
    return {"rtn_ours_grid": ours, "rtn_ct_grid": ct}


def spawn(side: str, data_path: Path, out_path: Path, num_samples: int, args) -> dict:
    import torch

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--data", str(data_path),
           "--worker-out", str(out_path), "--worker-samples", str(num_samples), "--threads", str(args.threads),
           "--pipeline", args.pipeline, "--true-sequential", args.true_sequential]
    log = out_path.with_suffix(".log")
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT), check=False)
    if proc.returncode:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"worker {side} (N={num_samples}) failed with code {proc.returncode}:\n{tail}")
    return torch.load(out_path)


def run_parent(args) -> None:
    import torch

    torch_threads(args.threads)
    import optimum_fair

    started = _dt.datetime.now(_dt.timezone.utc)
    model_fp, tok = load_fp(optimum_fair.DEFAULT_MODEL)
    mask_id = 3
    if tok.mask_token_id is not None and tok.mask_token_id != mask_id:
        raise RuntimeError(f"tokenizer's mask token id is {tok.mask_token_id}, expected {mask_id}")
    names = block_linear_names(len(model_fp.model.transformer.blocks))
    fp_w = {n: model_fp.get_submodule(n).weight.detach().float().clone() for n in names}
    held_ids, held_input, held_mask = masked_heldout(tok, mask_id)
    fp_logits = own_logits(model_fp, held_input)
    fp_metrics = logit_metrics(fp_logits, fp_logits, held_ids, held_mask)
    refs = {k: dict(logit_metrics(logits_with(model_fp, w, held_input), fp_logits, held_ids, held_mask),
                    mean_rel_weight_err=weight_error(w, fp_w)["mean_rel_weight_err"])
            for k, w in rtn_references(fp_w).items()}

    from optimum_fair.data import calibration_sequences
    from optimum_fair.digests import tensor_digest

    report = {
        "benchmark": "optimum-fair GPTQ vs llm-compressor GPTQ oneshot (W4A16, per channel, symmetric)",
        "date_utc": started.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(PACKAGES),
        "threads": args.threads,
        "cpu": cpu_name(),
        "loadavg_at_start": list(os.getloadavg()),
        "model": {"path": "optimum_fair/assets/teacher", "dtype_run": "float32 (stored fp16)",
                  "n_params": sum(p.numel() for p in model_fp.parameters()),
                  "quantized_linears": len(names), "kept_float": [HEAD]},
        "settings": {"w_bits": 4, "a_bits": 16, "sym": True, "group_size": "per channel", "damp": DAMP,
                     "gptq_block_size": GPTQ_BLOCK, "act_order": False, "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE,
                     "calib_data": "calibration_sequences('wiki', tok, N, 128, seed=0)",
                     "llmcompressor_pipeline": args.pipeline, "true_sequential": args.true_sequential,
                     "llmcompressor_sequential_targets": ["LLaDABlock"],
                     "repeats": args.repeats},
        "heldout": {"data": f"calibration_sequences('wiki-val', tok, {HELDOUT_SAMPLES}, {SEQ_LEN}, "
                            f"seed={HELDOUT_SEED})",
                    "mask": f"{int(MASK_FRACTION * 100)} % of positions per row (randperm, seed {MASK_SEED}) "
                            f"-> id {mask_id}",
                    "masked_positions": int(held_mask.sum()), "ids_digest": tensor_digest(held_ids)},
        "fp": fp_metrics,
        "rtn_references": refs,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="lcgptq_") as tmp:
        tmp = Path(tmp)
        for n in args.num_samples:
            calib_ids = calibration_sequences("wiki", tok, n, SEQ_LEN, seed=0)
            data_path = tmp / f"data_{n}.pt"
            torch.save({"calib_ids": calib_ids, "heldout_input": held_input}, data_path)
            results = {side: [] for side in TIMED}
            for r in range(args.repeats):
                for side in TIMED:
                    print(f"N={n} repeat {r + 1}/{args.repeats}: {side} ...", flush=True)
                    res = spawn(side, data_path, tmp / f"{side}_{n}_{r}.pt", n, args)
                    print(f"   wall {res['wall_s']:.2f} s, peak RSS {res['mem_after']['VmHWM']:.3f} GiB", flush=True)
                    results[side].append(res)
            run = summarize(n, calib_ids, results, model_fp, fp_w, fp_logits, held_input, held_ids, held_mask)
            ours_w, llmc_w = results["ours"][0]["weights"], results["llmcompressor"][0]["weights"]
            run["frac_codes_differing_from_llmc"] = {  # codes on the shared grid max|w| / 7.5
                k: float((torch.round(ours_w[k] / (fp_w[k].abs().amax(1, keepdim=True) / 7.5))
                          != torch.round(llmc_w[k] / (fp_w[k].abs().amax(1, keepdim=True) / 7.5))).float().mean())
                for k in fp_w}
            run["max_abs_weight_diff_to_llmc"] = max(float((ours_w[k] - llmc_w[k]).abs().max()) for k in fp_w)
            if not args.no_diagnostic:  # quality only: ours' GPTQ on version 1's grid, one process
                print(f"N={n}: ours-v1grid (diagnostic) ...", flush=True)
                diag = spawn("ours-v1grid", data_path, tmp / f"ours-v1grid_{n}.pt", n, args)
                swapped = logits_with(model_fp, diag["weights"], held_input)
                run["diagnostic_ours_v1_grid"] = {
                    "pipeline": diag["pipeline"], "wall_s": diag["wall_s"],
                    **logit_metrics(swapped, fp_logits, held_ids, held_mask), **weight_error(diag["weights"], fp_w)}
            report["runs"][str(n)] = run
    report["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    report["loadavg_at_end"] = list(os.getloadavg())
    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    Path(args.out_md).write_text(table)
    print(table)
    print(f"wrote {out_json} and {args.out_md}")


def summarize(n, calib_ids, results, model_fp, fp_w, fp_logits, held_input, held_ids, held_mask) -> dict:
    import torch

    from optimum_fair.digests import tensor_digest

    out = {"calib_ids_digest": tensor_digest(calib_ids), "sides": {}}
    for side, runs in results.items():
        first = runs[0]
        # the quantized weights must not depend on the repeat
        max_repeat_diff = max((float((r["weights"][k] - first["weights"][k]).abs().max())
                               for r in runs[1:] for k in first["weights"]), default=0.0)
        swapped = logits_with(model_fp, first["weights"], held_input)
        own_vs_swapped = float((first["logits"] - swapped).abs().max())
        walls = [r["wall_s"] for r in runs]
        peaks = [r["mem_after"]["VmHWM"] for r in runs]
        entry = {
            "pipeline": first["pipeline"],
            "wall_s": walls,
            "wall_s_median": statistics.median(walls),
            "windows_in_call_s_median": statistics.median(r["tokenize_s"] for r in runs),
            "compute_dtype": first.get("compute_dtype", "model's (float32)"),
            "peak_rss_gib": peaks,
            "peak_rss_gib_median": statistics.median(peaks),
            "rss_before_calib_gib_median": statistics.median(r["mem_before"]["VmRSS"] for r in runs),
            "hwm_before_calib_gib_median": statistics.median(r["mem_before"]["VmHWM"] for r in runs),
            "rss_anon_after_gib_median": statistics.median(r["mem_after"]["RssAnon"] for r in runs),
            "hwm_after_tokenize_gib_median": (statistics.median(r["mem_after_tokenize"]["VmHWM"] for r in runs)
                                              if "mem_after_tokenize" in first else None),
            "threads_in_worker": sorted({r["threads"] for r in runs}),
            "calib_ids_match": all(r["ids_match"] for r in runs),
            "head_untouched": all(r["head_untouched"] for r in runs),
            "codes_range": first["codes_range"],
            "max_weight_diff_across_repeats": max_repeat_diff,
            "own_model_vs_swapped_logits_max_abs_diff": own_vs_swapped,
            **logit_metrics(swapped, fp_logits, held_ids, held_mask),
            **weight_error(first["weights"], fp_w),
        }
        if "max_off_grid" in first:
            entry["max_off_grid_codes"] = first["max_off_grid"]
        out["sides"][side] = entry
    ours, lc = out["sides"]["ours"], out["sides"]["llmcompressor"]
    out["ratio_wall_ours_over_llmc"] = ours["wall_s_median"] / lc["wall_s_median"]
    out["ratio_wall_ours_fp32_over_llmc"] = out["sides"]["ours-fp32"]["wall_s_median"] / lc["wall_s_median"]
    out["ratio_wall_ours_min_over_llmc_min"] = min(ours["wall_s"]) / min(lc["wall_s"])
    out["ratio_peak_rss_ours_over_llmc"] = ours["peak_rss_gib_median"] / lc["peak_rss_gib_median"]
    both = [ours["per_linear_rel_weight_err"][k] < lc["per_linear_rel_weight_err"][k]
            for k in ours["per_linear_rel_weight_err"]]
    out["linears_where_ours_has_lower_weight_err"] = int(sum(both))
    same = sum(bool(torch.equal(results["ours"][0]["weights"][k], results["llmcompressor"][0]["weights"][k]))
               for k in fp_w)
    out["linears_with_identical_weights"] = int(same)
    return out


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [
        "# GPTQ W4A16 (per channel, symmetric): optimum-fair vs llm-compressor",
        "",
        (f"Model: shipped LLaDA teacher ({report['model']['n_params'] / 1e6:.2f} M params, run in float32), "
        f"28 block linears quantized, head `{HEAD}` kept float. Calibration: "
        f"`{report['settings']['calib_data']}`, batch 4, damp 0.01, block 128, no act-order. "
        f"Ours: `true_sequential={report['settings'].get('true_sequential', 'yes') == 'yes'}`. "
        f"llm-compressor pipeline: `{report['settings']['llmcompressor_pipeline']}` "
        f"(sequential_targets LLaDABlock). CPU, {report['threads']} thread ({report['cpu']}), "
        f"load average at start {report['loadavg_at_start'][0]:.2f} (another job shared the machine). "
        f"Medians of {report['settings']['repeats']} fresh processes per side; both sides are handed token ids, "
        f"ours a Dataset of one row of ids per document, from which it draws the windows inside the timed call."),
        "",
        (f"Versions: torch {v['torch']}, transformers {v['transformers']}, llmcompressor {v['llmcompressor']}, "
        f"compressed-tensors {v['compressed-tensors']}, optimum-fair {v['optimum-fair']} "
        f"(commit {str(report['git_commit'])[:7]}). Date {report['date_utc']}."),
        "",
        (f"Held-out: {report['heldout']['data']}, {report['heldout']['mask']} "
        f"({report['heldout']['masked_positions']} masked positions). FP masked NLL "
        f"{report['fp']['masked_nll']:.4f}."),
        "",
        ("| N | method | calib time (s) | time ratio ours/llmc | peak RSS (GiB) | RSS ratio ours/llmc "
        "| rel. logit err | masked NLL | mean rel. W err |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, run in report["runs"].items():
        lc = run["sides"]["llmcompressor"]
        for side in ("ours", "ours-fp32"):
            ours = run["sides"][side]
            ratio = ours["wall_s_median"] / lc["wall_s_median"]
            lines.append(
                f"| {n} | optimum-fair GPTQ, forwards in {ours['compute_dtype'].removeprefix('torch.')} "
                f"| {ours['wall_s_median']:.2f} | {ratio:.2f} | {ours['peak_rss_gib_median']:.3f} "
                f"| {ours['peak_rss_gib_median'] / lc['peak_rss_gib_median']:.2f} "
                f"| {ours['rel_logit_err']:.4f} | {ours['masked_nll']:.4f} | {ours['mean_rel_weight_err']:.4f} |")
        lines.append(
            f"| {n} | llm-compressor GPTQ | {lc['wall_s_median']:.2f} | 1 | {lc['peak_rss_gib_median']:.3f} | 1 "
            f"| {lc['rel_logit_err']:.4f} | {lc['masked_nll']:.4f} | {lc['mean_rel_weight_err']:.4f} |")
    for n, run in report["runs"].items():
        d = run.get("diagnostic_ours_v1_grid")
        if d:
            lines.append(
                f"| {n} | diagnostic: optimum-fair GPTQ, `weight_grid=\"symmetric\"` (max\\|w\\|/7) | - | - | - | - "
                f"| {d['rel_logit_err']:.4f} | {d['masked_nll']:.4f} | {d['mean_rel_weight_err']:.4f} |")
    refs = report["rtn_references"]
    lines += [
        f"| - | FP (reference) | - | - | - | - | 0 | {report['fp']['masked_nll']:.4f} | 0 |",
        (f"| - | RTN, version 1's grid max\\|w\\|/7 | - | - | - | - | {refs['rtn_ours_grid']['rel_logit_err']:.4f} "
        f"| {refs['rtn_ours_grid']['masked_nll']:.4f} | {refs['rtn_ours_grid']['mean_rel_weight_err']:.4f} |"),
        (f"| - | RTN, the full grid max\\|w\\|/7.5 (both sides) | - | - | - | - "
        f"| {refs['rtn_ct_grid']['rel_logit_err']:.4f} | {refs['rtn_ct_grid']['masked_nll']:.4f} "
        f"| {refs['rtn_ct_grid']['mean_rel_weight_err']:.4f} |"),
        "",
        ("Peak RSS is the whole process (interpreter, torch, transformers, and for llm-compressor its own "
        "imports) at the end of the calibration call; RSS before the call (model loaded):"),
    ]
    for n, run in report["runs"].items():
        ours, lc = run["sides"]["ours"], run["sides"]["llmcompressor"]
        lines.append(
            f"N={n}: ours {ours['rss_before_calib_gib_median']:.3f} -> peak {ours['peak_rss_gib_median']:.3f} GiB "
            f"(peak already {ours['hwm_after_tokenize_gib_median']:.3f} GiB right after drawing its windows); "
            f"llm-compressor {lc['rss_before_calib_gib_median']:.3f} -> peak {lc['peak_rss_gib_median']:.3f} GiB. "
            f"Wall times ours {[round(x, 2) for x in ours['wall_s']]}, llmc {[round(x, 2) for x in lc['wall_s']]}. "
            f"Same calibration ids: {ours['calib_ids_match']}; heads untouched: "
            f"{ours['head_untouched'] and lc['head_untouched']}; ours lower W err on "
            f"{run['linears_where_ours_has_lower_weight_err']}/28 linears; identical weights on "
            f"{run['linears_with_identical_weights']}/28.")
    for n, run in report["runs"].items():
        fracs = run.get("frac_codes_differing_from_llmc")
        if fracs:
            same = [k.replace("model.transformer.", "") for k, f in fracs.items() if f == 0]
            lines.append(
                f"N={n}: our codes identical to llm-compressor's "
                f"on {len(same)}/28 linears ({', '.join(same) or 'none'}); mean fraction of differing codes on the "
                f"others {statistics.fmean([f for f in fracs.values() if f > 0] or [0]):.3f}.")
    lines += [
        "",
        ("Reproduce (llm-compressor 0.14.0.1 pins transformers<=5.17 and compressed-tensors==0.19, so it gets "
        "its own virtualenv; optimum-fair is installed there without its dependency pins):"),
        "",
        "```bash",
        "python -m venv /tmp/lcvenv",
        "/tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gensim optimum",
        "/tmp/lcvenv/bin/pip install --no-deps -e .",
        "OMP_NUM_THREADS=1 /tmp/lcvenv/bin/python benchmarks/llmcompressor_gptq.py --num-samples 128 32 --repeats 3",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pipeline", default="sequential", help="llm-compressor calibration pipeline")
    parser.add_argument("--true-sequential", choices=("yes", "no"), default="no",
                        help="ours' FairCalibConfig.true_sequential: GPTQ Hessians group by group (yes) or all "
                             "groups from one pass of the float block (no, as llm-compressor)")
    parser.add_argument("--out-json", default=str(RESULTS / "llmcompressor_gptq.json"))
    parser.add_argument("--out-md", default=str(RESULTS / "llmcompressor_gptq.md"))
    parser.add_argument("--no-diagnostic", action="store_true",
                        help="skip the extra run of ours on version 1's symmetric grid (max|w|/7)")
    parser.add_argument("--worker", choices=(*SIDES_OURS, "llmcompressor"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker-samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        run_worker(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
