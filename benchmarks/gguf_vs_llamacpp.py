"""GGUF files from llama.cpp's own quantizer against optimum-fair's calibrated ones, on the shipped model.

    python benchmarks/gguf_vs_llamacpp.py --types Q4_0 Q4_K_M Q8_0 --out benchmarks/results/gguf_vs_llamacpp.json

Builds llama.cpp (scripts/build_llama_cpp.py; a finished build is reused) and writes the FP teacher as an
F32 GGUF with our exporter. Per GGUF type T (`--types`; Q4_K_M and IQ4_XS are llama.cpp's named mixes):

* `llama-quantize` T, without and with an importance matrix that `llama-imatrix` made from the text of
  our calibration windows (the same windows, one per line: the same number of tokens, plus the newlines);
  each also with the token embedding and the output head kept F32 (`--token-embedding-type f32
  --output-tensor-type f32`), which separates the block linears' error from the embedding's and head's;
* optimum-fair calibrated for T (`FairCalibConfig(gguf_type=T)`: GPTQ in the GGUF grid, the same
  calibration windows, masked decode-like inputs unless `--calib-inputs text`; `--input-mode corrected`:
  GPTQ towards the FP model's outputs, the recommended recipe), weighting uniform and fair, exported
  with `export(model, out, "gguf")` and, where the exporter takes `gguf_type`, also as llama.cpp's mix
  (embedding and head quantized). A type the package refuses is recorded as not
  supported.

Every file is read back with the `gguf` package's dequantizer into a float LLaDA and scored with the
package's `evaluate` against the FP teacher's greedy trajectories (the same prompts for every file):
frontier flip rate, flip rate at teacher margin >= 0.1, masked NLL on wiki-val and lee. Each file is paired
with its reference, llama-quantize T with the imatrix and the embedding / head stored the same way
(F32 or quantized): flip-rate differences over prompts, NLL differences over windows, 95 % bootstrap
intervals (benchmarks/methods_report.py). Bits per weight: the file's bytes * 8 / the parameter count,
the tensors' data only, and per tensor group (block linears, embedding, head). Relative weight error
||W_q - W|| / ||W|| per group says which tensors carry the error. `llama-diffusion-cli` decodes one
prompt on a 64-token canvas with each file, one thread: median of 3 runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gguf_readback import file_bits, gguf_readback  # benchmarks/ is this script's directory
from machine import machine
from methods_report import paired_difference
from workers import git_commit, versions

import optimum_fair
from optimum_fair.data import calibration_sequences, load_texts
from optimum_fair.eval.evaluate import build_teacher_traces, evaluate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # scripts/ for the llama.cpp build
from scripts.build_llama_cpp import VERSION, build, default_cache  # noqa: E402

TYPES = ("Q4_0", "Q4_K_M", "Q8_0", "IQ4_XS", "Q6_K")
EVAL = dict(texts=("wiki-val", "lee"), num_prompts=12, prompt_len=64, gen_length=64, block_length=32,
            nll_samples=32, seq_len=128, post_commit_prompts=0)
PROMPT = "The history of the city begins with"
GROUPS = {"wte": "embedding", "ff_out": "head", "q_proj": "attn", "k_proj": "attn", "v_proj": "attn",
          "attn_out": "attn", "ff_proj": "ffn", "up_proj": "ffn"}  # blocks' ff_out: "ffn" (see weight_errors)
logger = logging.getLogger("gguf_vs_llamacpp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=list(TYPES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gguf_vs_llamacpp.json")
    p.add_argument("--jobs", type=int, default=1, help="build jobs for llama.cpp (if not built yet)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; llama.cpp's tools always run on one")
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows (ours and the imatrix)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-probes", type=int, default=128, help="Stage I probes of the fair cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fold-rotation", action="store_true", help="our files: FairCalibConfig(fold_rotation=True)")
    p.add_argument("--act-order", action="store_true", help="our files: FairCalibConfig(act_order=True)")
    p.add_argument("--input-mode", default="quantized", choices=["quantized", "corrected"],
                   help="our files: FairCalibConfig(input_mode=...)")
    p.add_argument("--calib-inputs", default="masked", choices=["masked", "text"],
                   help="our Stage II inputs: masked (decode-like canvases, the better here) or text")
    p.add_argument("--repeats", type=int, default=3, help="llama-diffusion-cli runs per file (median)")
    p.add_argument("--num-prompts", type=int, default=EVAL["num_prompts"])
    p.add_argument("--work", type=Path, default=None, help="folder for the GGUF files (default: a temporary one)")
    return p.parse_args(argv)


def run_tool(cache: Path, tool: str, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """One llama.cpp tool from `cache`/bin, its libraries beside it; raises with its log's tail on failure."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(cache / "bin"))
    done = subprocess.run([str(cache / "bin" / tool), *args], capture_output=True, text=True, errors="replace",
                          env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def calibration_text(tok, dataset, num_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    """Our calibration windows (num_samples, seq_len), as the pipeline draws them, and their text joined by
    newlines (the EOS between documents kept as text: llama-imatrix parses it back with --parse-special)."""
    ids = calibration_sequences(load_texts(dataset), tok, num_samples, seq_len, seed=seed)
    return ids, "\n".join(tok.decode(w, skip_special_tokens=False) for w in ids)


def write_f32(teacher, tok, out: Path) -> Path:
    """The FP teacher as an unquantized GGUF (every tensor F32), through the package's exporter."""
    from optimum_fair.export import export

    return export(teacher, out, "gguf", tokenizer=tok, gguf_type="F32")


def make_imatrix(cache: Path, f32: Path, text: Path, out: Path, seq_len: int, chunks: int) -> dict:
    """llama-imatrix over the calibration text: whole windows in one batch (a non-causal model)."""
    start = time.perf_counter()
    done = run_tool(cache, "llama-imatrix", "-m", str(f32), "-f", str(text), "-o", str(out), "-c", str(seq_len),
                    "-b", str(seq_len), "-ub", str(seq_len), "--chunks", str(chunks), "--parse-special",
                    "--no-ppl", "-t", "1")
    line = next((x for x in done.stderr.splitlines() if "computing over" in x), "")
    return {"seconds": round(time.perf_counter() - start, 1), "log": line.strip(), "path": out.name}


def llama_quantize(cache: Path, f32: Path, out: Path, qtype: str, imatrix: Path | None, float_ends: bool) -> Path:
    flags = ["--imatrix", str(imatrix)] if imatrix else []
    if float_ends:
        flags += ["--token-embedding-type", "f32", "--output-tensor-type", "f32"]
    run_tool(cache, "llama-quantize", *flags, str(f32), str(out), qtype, "1")
    return out


def llama_files(cache: Path, f32: Path, imatrix: Path, work: Path, qtype: str) -> list[dict]:
    """llama-quantize `qtype` with / without the imatrix, llama.cpp's mix / embedding and head F32."""
    rows = []
    for use_imatrix in (False, True):
        for float_ends in (False, True):
            name = f"llama-quantize {qtype}" + (" + imatrix" if use_imatrix else "") + \
                (", emb/head F32" if float_ends else "")
            path = work / (name.replace(" ", "_").replace(",", "").replace("/", "-").replace("+", "") + ".gguf")
            llama_quantize(cache, f32, path, qtype, imatrix if use_imatrix else None, float_ends)
            rows.append({"file": name, "type": qtype, "source": "llama-quantize", "imatrix": use_imatrix,
                         "path": path})
    return rows


def our_files(model_path, tok, qtype: str, weighting: str, args, work: Path, prior: list) -> list[dict]:
    """optimum-fair calibrated for `qtype`: the export as it is and, where the exporter takes gguf_type,
    llama.cpp's mix. Raises ValueError where the package does not take the type."""
    from transformers import AutoModel

    from optimum_fair import FairCalibConfig, calibration_result
    from optimum_fair.export import export

    fields = dict(gguf_type=qtype, rounding="gptq", transform="none", a_bits=16, weighting=weighting,
                  dataset="wiki", num_samples=args.num_samples, seq_len=args.seq_len, num_probes=args.num_probes,
                  seed=args.seed, tokenizer=str(model_path), calib_inputs=args.calib_inputs,
                  fold_rotation=args.fold_rotation, act_order=args.act_order, input_mode=args.input_mode)
    if weighting == "fair" and prior:
        fields["prior"] = str(prior[0])  # one Stage I prior for every fair cell
    config = FairCalibConfig(**fields)  # ValueError: a type the package does not take
    start = time.perf_counter()
    model = AutoModel.from_pretrained(model_path, quantization_config=config)  # fp16 scales, as shipped
    calib_s = round(time.perf_counter() - start, 1)
    if weighting == "fair" and not prior:
        prior.append(work / "prior")
        calibration_result(model).prior.save(prior[0])
    base = dict(type=qtype, source="optimum-fair", imatrix=False, weighting=weighting, calib_s=calib_s)
    name = f"optimum-fair {qtype} {weighting}" + (" + rotation" if args.fold_rotation else "") + \
        (" + act_order" if args.act_order else "") + (f" + {args.input_mode}" if args.input_mode != "quantized" else "")
    rows = [{**base, "file": name, "path": export(model, work / f"ours_{qtype}_{weighting}.gguf", "gguf",
                                                  tokenizer=tok)}]
    try:
        mix = export(model, work / f"ours_{qtype}_{weighting}_mix.gguf", "gguf", tokenizer=tok, gguf_type=qtype)
        rows.append({**base, "file": name + ", llama.cpp's mix", "path": mix})
    except ValueError as err:  # a type whose mix the exporter does not write
        logger.warning("%s: no mix export (%s)", name, err)
    return rows


def reported_ms(log: str) -> float | None:
    """The "total time: X ms" llama-diffusion-cli logs (None where the log was cut before it)."""
    _, found, tail = log.rpartition("total time:")
    return float(tail.split("ms", 1)[0]) if found else None


def diffusion_time(cache: Path, path: Path, repeats: int) -> dict:
    """Median of `repeats` llama-diffusion-cli decodes: 64-token canvas (prompt included), 2 blocks of 32,
    64 steps, greedy, one thread; its own reported time and the process's wall time."""
    args = ["-m", str(path), "-p", PROMPT, "--diffusion-steps", "64", "--diffusion-block-length", "32",
            "--temp", "0", "--seed", "0", "-t", "1", "-c", "128", "-ub", "64", "-b", "64"]
    reported, wall = [], []
    for _ in range(repeats):
        for _attempt in range(3):  # llama.cpp can exit before its log thread flushes (rare): run again
            start = time.perf_counter()
            done = run_tool(cache, "llama-diffusion-cli", *args, timeout=600)
            ms = reported_ms(done.stderr)
            if ms is not None:
                break
        reported.append(ms)
        wall.append(1000 * (time.perf_counter() - start))
    return {"diffusion_ms": statistics.median(x for x in reported if x is not None),
            "diffusion_wall_ms": statistics.median(wall), "diffusion_runs_ms": reported}


def weight_errors(model, teacher) -> dict:
    """||W_q - W|| / ||W|| per tensor group (embedding, head, attn, ffn) of a read-back model."""
    err: dict[str, list[float]] = {}
    ref = teacher.state_dict()
    for name, value in model.state_dict().items():
        leaf = name.rpartition(".")[0].rpartition(".")[2]
        group = "ffn" if leaf == "ff_out" and ".blocks." in name else GROUPS.get(leaf)
        if group:
            e = err.setdefault(group, [0.0, 0.0])
            e[0] += float((value - ref[name].float()).pow(2).sum())
            e[1] += float(ref[name].float().pow(2).sum())
    return {f"rel_err_{g}": (a / b) ** 0.5 for g, (a, b) in err.items()}


def score(row: dict, cache: Path, teacher, tok, traces, args, num_params: int) -> dict:
    """Bits, read-back quality against the teacher, weight errors and llama.cpp's decode time of one file."""
    path = Path(row.pop("path"))
    row["gguf"] = path.name
    model = gguf_readback(path, Path(optimum_fair.DEFAULT_MODEL))
    bits = file_bits(path, num_params)
    bits["float_ends"] = bits["types_embedding"] == {"F32": 1} and bits["types_head"] == {"F32": 1}
    metrics = evaluate(model, tok, teacher_traces=traces, details=True, **{**EVAL, "num_prompts": args.num_prompts})
    row.update(bits, **weight_errors(model, teacher), **metrics, **diffusion_time(cache, path, args.repeats))
    logger.info("%s: %.2f bpw, flip %.4f, wiki-val nll %.4f, %.0f ms", row["file"], row["bpw_file"],
                row["flip_rate"], row["wiki-val/nll"], row["diffusion_ms"])
    return row


def reference_of(row: dict, rows: list[dict]) -> dict | None:
    """llama-quantize of the row's type with the imatrix, embedding / head stored as in the row (None for
    that file itself, the F32 file, or where it is missing)."""
    for r in rows:
        if (r["source"] == "llama-quantize" and r["imatrix"] and r["type"] == row["type"]
                and r["float_ends"] == row["float_ends"] and r["file"] != row["file"]):
            return r
    return None


def pairs(rows: list[dict]) -> list[dict]:
    """Every file against its reference: flip-rate and NLL differences with bootstrap intervals."""
    out = []
    for row in rows:
        ref = reference_of(row, rows)
        if ref is not None:
            d = paired_difference({0: row}, {0: ref})
            out.append({"file": row["file"], "reference": ref["file"], **{k: v for k, v in d.items() if k != "seeds"}})
            row["vs_reference"] = out[-1]
    return out


def targets(rows: list[dict]) -> list[dict]:
    """Issue 31's targets for each of our files: against the better (lower flip rate) of llama-quantize with
    and without the imatrix at the same type and embedding / head storage, flip rate <= 0.8x, NLL no higher
    on either text, the paired flip interval below zero, file size within 2 %."""
    out = []
    for row in rows:
        theirs = [r for r in rows if r["source"] == "llama-quantize" and r["type"] == row["type"]
                  and r["float_ends"] == row["float_ends"]]
        if row["source"] != "optimum-fair" or not theirs:
            continue
        best = min(theirs, key=lambda r: r["flip_rate"])
        d = paired_difference({0: row}, {0: best})
        out.append({"file": row["file"], "better_llama": best["file"],
                    "flip_ratio": row["flip_rate"] / best["flip_rate"] if best["flip_rate"] else float("inf"),
                    "flip_rate_diff": d["flip_rate_diff"], "flip_rate_ci": d["flip_rate_ci"],
                    "nll_diff": {t: row[f"{t}/nll"] - best[f"{t}/nll"] for t in EVAL["texts"]},
                    "size_ratio": row["bpw_file"] / best["bpw_file"]})
        t = out[-1]
        t["met"] = (t["flip_ratio"] <= 0.8 and max(t["nll_diff"].values()) <= 0 and t["flip_rate_ci"][1] < 0
                    and abs(t["size_ratio"] - 1) <= 0.02)
    return out


def markdown(rows: list[dict]) -> str:
    head = ["file", "types (linears / emb / head)", "bpw file", "bpw data", "bpw linears", "flip rate",
            "flip m≥0.1", "wiki-val NLL", "lee NLL", "Δ flip vs ref [95 % CI]", "rel err lin / emb / head",
            "diffusion-cli ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        types = " / ".join("+".join(sorted(r[f"types_{g}"])) for g in ("linear", "embedding", "head"))
        d = r.get("vs_reference")
        diff = "-" if d is None else (f"{100 * d['flip_rate_diff']:+.2f} pts [{100 * d['flip_rate_ci'][0]:+.2f}, "
                                      f"{100 * d['flip_rate_ci'][1]:+.2f}]")
        lin = (r["rel_err_attn"] ** 2 + r["rel_err_ffn"] ** 2) ** 0.5 / 2 ** 0.5  # the two groups' mean square
        errs = f"{lin:.3f} / {r['rel_err_embedding']:.3f} / {r['rel_err_head']:.3f}"
        lines.append(f"| {r['file']} | {types} | {r['bpw_file']:.2f} | {r['bpw_data']:.2f} | {r['bpw_linear']:.2f} "
                     f"| {r['flip_rate']:.4f} | {r['flip_rate_m0.1']:.4f} | {r['wiki-val/nll']:.4f} | "
                     f"{r['lee/nll']:.4f} | {diff} | {errs} | {r['diffusion_ms']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    started = time.time()
    cache = build(default_cache(), args.jobs)
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf_vs_llamacpp_"))
    work.mkdir(parents=True, exist_ok=True)
    path = Path(optimum_fair.DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    num_params = sum(v.numel() for v in teacher.state_dict().values())
    f32 = write_f32(copy.deepcopy(teacher), tok, work / "teacher_f32.gguf")
    ids, text = calibration_text(tok, "wiki", args.num_samples, args.seq_len, args.seed)
    (work / "calib.txt").write_text(text)
    imatrix = make_imatrix(cache, f32, work / "calib.txt", work / "imatrix.gguf", args.seq_len, args.num_samples)
    traces = build_teacher_traces(teacher, tok, **{k: EVAL[k] for k in ("texts", "prompt_len", "gen_length",
                                                                        "block_length")},
                                  num_prompts=args.num_prompts)
    files = [{"file": "F32 (our export)", "type": "F32", "source": "optimum-fair", "imatrix": False, "path": f32}]
    not_supported, prior = {}, []
    for qtype in args.types:
        files += llama_files(cache, f32, work / "imatrix.gguf", work, qtype)
        for weighting in ("uniform", "fair"):
            try:
                files += our_files(path, tok, qtype, weighting, args, work, prior)
            except ValueError as err:  # a type the package does not calibrate in
                not_supported[f"{qtype} {weighting}"] = f"not supported yet: {err}"
                logger.warning("optimum-fair %s %s: not supported yet (%s)", qtype, weighting, err)
    rows = [score(r, cache, teacher, tok, traces, args, num_params) for r in files]
    result = {"command": " ".join(["python", "benchmarks/gguf_vs_llamacpp.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "llama_cpp_threads": 1, "torch_threads": args.threads,
              "llama_cpp": f"llama-cpp-python {VERSION} sdist", "commit": git_commit(),
              "versions": versions(("torch", "transformers", "gguf", "optimum-fair")),
              "eval": {**EVAL, "num_prompts": args.num_prompts, "texts": list(EVAL["texts"])},
              "calibration": {"dataset": "wiki", "num_samples": args.num_samples, "seq_len": args.seq_len,
                              "tokens": ids.numel(), "seed": args.seed, "num_probes": args.num_probes},
              "imatrix": imatrix, "params": num_params, "not_supported": not_supported,
              "pairs": pairs(rows), "targets": targets(rows), "rows": rows, "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(markdown(rows))
    for t in result["targets"]:
        nll = ", ".join(f"{k} {v:+.4f}" for k, v in t["nll_diff"].items())
        print(f"{t['file']} vs {t['better_llama']}: flip x{t['flip_ratio']:.2f} "
              f"({100 * t['flip_rate_diff']:+.2f} pts [{100 * t['flip_rate_ci'][0]:+.2f}, "
              f"{100 * t['flip_rate_ci'][1]:+.2f}]), NLL {nll}, size x{t['size_ratio']:.3f}: "
              f"{'met' if t['met'] else 'missed'}")
    for key, why in not_supported.items():
        print(f"optimum-fair {key}: {why}")


if __name__ == "__main__":
    main()
