"""Quantize the shipped diffusion LM to W4A4 with FAIR-Calib and print a before/after table.

    python examples/quickstart.py            # fully offline; 79 s on a quiet 2-core AMD EPYC (2 threads)

The full-precision model is the teacher: Stage I rolls it out to build the position prior, Stage II
calibrates its blocks against its own hidden states. The table compares FP, plain round-to-nearest
and FAIR-Calib on held-out Wikipedia and news text: masked-token NLL, frontier flip rate (how often
the quantized model would commit a different token than the teacher at the teacher's frontier) and
greedy-decode agreement with the teacher.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import AutoModel, AutoTokenizer

import optimum_fair
from optimum_fair import FairCalibConfig, save_quantized
from optimum_fair.eval.evaluate import build_teacher_traces, evaluate, table

COLUMNS = ["wiki-val/nll", "lee/nll", "flip_rate", "flip_rate_m0.1", "agreement", "seconds"]
# 8 prompts per text; no leave-one-out post-commit reading (not in this table; it costs most of evaluate's time)
EVAL = {"num_prompts": 8, "post_commit_prompts": 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=optimum_fair.DEFAULT_MODEL)
    p.add_argument("--output-dir", default="out/fair-w4a4")
    p.add_argument("--num-probes", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    # the shipped weights are stored in fp16; CPUs emulate fp16 matmuls slowly, so compute in float32 (exact)
    load = {"dtype": torch.float32}

    teacher = AutoModel.from_pretrained(args.model, **load).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    traces = build_teacher_traces(teacher, tok, num_prompts=8)
    rows = {"FP teacher": evaluate(teacher, tok, teacher_traces=traces, **EVAL)}

    configs = {
        "RTN W4A4": FairCalibConfig(rounding="rtn", transform="none"),
        "FAIR-Calib W4A4": FairCalibConfig(num_probes=args.num_probes, num_samples=args.num_samples,
                                           epochs=args.epochs, seq_len=128, window=64),
    }
    for name, cfg in configs.items():
        start = time.perf_counter()
        # the one line a user writes: load and quantize (Stage I + Stage II run inside from_pretrained)
        model = AutoModel.from_pretrained(args.model, quantization_config=cfg, **load)
        seconds = time.perf_counter() - start
        rows[name] = evaluate(model, tok, teacher_traces=traces, **EVAL)
        rows[name]["seconds"] = seconds  # loading + calibration
    # the folder a Hub repo would get: packed weights (with the Stage I prior), tokenizer, prior/, model card
    # with the table (model.save_pretrained, transformers' own, writes the weights and config only)
    save_quantized(model, args.output_dir, tok, metrics={"fp": rows["FP teacher"], "quantized": rows[name]},
                   overwrite=True)
    reloaded = AutoModel.from_pretrained(args.output_dir)
    ids = torch.randint(0, len(tok), (1, 32))
    with torch.no_grad():
        same = torch.equal(reloaded(ids).logits, model(ids).logits)
    print(table(rows, columns=COLUMNS))
    print(f"\nsaved to {args.output_dir}; reloaded without calibration, identical logits: {same}")


if __name__ == "__main__":
    main()
