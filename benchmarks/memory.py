"""Peak memory of calibration: the FP model fully in RAM vs disk-offloaded sequential calibration.

Both modes run the public path, ``AutoModel.from_pretrained(path, quantization_config=FairCalibConfig(...))``
(Stage I rollouts + Stage II GPTQ/Hadamard W4A4 on the ``lee`` texts), each in a fresh subprocess so
that each has its own peak:

* ``inram``: the bf16 model is loaded into RAM, then quantized in place;
* ``offload``: ``device_map`` puts every block (and the embedding/head) on ``"disk"``; calibration
  materialises one block at a time and keeps only its packed W4 replacement.

The model is a random LLaDA written shard by shard (``scale_8b.write_random_model``) with a character
vocabulary, so its size on disk is almost all decoder blocks. Peak RSS is sampled every 20 ms; the
table also gives peak minus the process's RSS after imports (torch + transformers, the same in both
modes) so that the ratio to the model's size is not drowned by the interpreter. Both runs must give
the same logits afterwards (checked).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/memory.py --threads 2                       # 8 layers, d_model 1024
    OMP_NUM_THREADS=2 python benchmarks/memory.py --threads 2 --d-model 2048 --mlp 6144 --n-heads 16 \\
        --out benchmarks/results/memory_d2048.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_8b import ROOT, GiB, RssMonitor, _status, disk_size, llada_config, offload_map, write_random_model


def char_tokenizer():
    """A character-level fast tokenizer with a mask token, built in memory (as tests/conftest.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {c: i for i, c in enumerate(["<unk>", "<|eos|>", "<|pad|>", "<|mask|>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", mask_token="<|mask|>")


def calib_config(args, tok):
    from optimum_fair import FairCalibConfig

    return FairCalibConfig(rounding="gptq", transform="hadamard", w_bits=4, a_bits=4, num_probes=args.probes,
                           num_samples=args.samples, seq_len=args.seq_len, window=args.window,
                           block_length=args.window, batch_size=4, dataset="lee", tokenizer=tok)


def child(args) -> None:
    """One mode in this process; writes its numbers (and its logits on a fixed input) to args.result."""
    import datasets  # noqa: F401  (imported before the baseline: a constant, not the model's)
    from transformers import AutoModel

    import optimum_fair
    import optimum_fair.data
    import optimum_fair.pipeline.stage1  # noqa: F401
    from optimum_fair import FairLinear

    torch.set_num_threads(args.threads)
    path = Path(args.path)
    tok = char_tokenizer()
    config = llada_config(args.layers, args.d_model, args.n_heads, args.mlp, len(tok), tok.mask_token_id)
    base = _status()
    kw = {}
    if args.mode == "offload":
        kw = {"device_map": offload_map(config, "disk"),
              "offload_folder": str(Path(args.result).parent / "offload")}
    with RssMonitor() as mon:
        with mon.phase("load+calibrate"):
            model = AutoModel.from_pretrained(path, quantization_config=calib_config(args, tok),
                                              dtype=torch.bfloat16, **kw)
        blocks = model.model.transformer.blocks
        n_fair = sum(isinstance(m, FairLinear) for m in blocks.modules())
        x = torch.randint(4, len(tok), (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(x).logits.float()
        summary = mon.summary()
    torch.save(logits, Path(args.result).with_suffix(".pt"))
    out = {"mode": args.mode, "base_rss_gib": base["VmRSS"] / GiB, "base_anon_gib": base["RssAnon"] / GiB,
           "seconds": mon.phases["load+calibrate"]["seconds"], "fair_linears": n_fair, **summary}
    Path(args.result).write_text(json.dumps(out))


def table(res: dict) -> str:
    size = res["disk_gib"]
    lines = [("| mode | peak RSS | peak anon | after imports (RSS / anon) | peak above imports (RSS / anon) "
              "| above imports / size on disk (RSS / anon) | time (s) |"), "|---|---|---|---|---|---|---|"]
    for m in res["modes"].values():
        rss, anon = m["peak_rss_gib"] - m["base_rss_gib"], m["peak_anon_gib"] - m["base_anon_gib"]
        lines.append(f"| {m['mode']} | {m['peak_rss_gib']:.3f} | {m['peak_anon_gib']:.3f} "
                     f"| {m['base_rss_gib']:.3f} / {m['base_anon_gib']:.3f} | {rss:.3f} / {anon:.3f} "
                     f"| {rss / size:.2f} / {anon / size:.2f} | {m['seconds']:.1f} |")
    lines.append(f"\nGiB throughout. model: {res['model']}, {size:.3f} GiB bf16 on disk; offload / inram, "
                 f"peak above imports: {res['offload_over_inram']:.2f} (RSS), {res['offload_over_inram_anon']:.2f} "
                 f"(anon); same logits after calibration: {res['same_logits']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["inram", "offload"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--path", default=str(ROOT / "runs/bench/memory-model"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/memory.json"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--n-heads", type=int, default=16)
    ap.add_argument("--mlp", type=int, default=3072)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the model written under --path")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.mode:
        return child(args)
    path = Path(args.path)
    shutil.rmtree(path, ignore_errors=True)
    write_random_model(path, llada_config(args.layers, args.d_model, args.n_heads, args.mlp,
                                          len(char_tokenizer()), char_tokenizer().mask_token_id))
    res = {"model": {"n_layers": args.layers, "d_model": args.d_model, "n_heads": args.n_heads, "mlp": args.mlp,
                     "vocab": len(char_tokenizer())},
           "settings": {k: v for k, v in vars(args).items() if k not in ("mode", "result", "path", "out")},
           "disk_gib": disk_size(path) / GiB, "modes": {}, "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("inram", "offload"):
            result = Path(tmp) / mode / "result.json"
            result.parent.mkdir()
            argv = [a for a in sys.argv[1:]]
            subprocess.run([sys.executable, __file__, *argv, "--mode", mode, "--result", str(result)], check=True)
            res["modes"][mode] = json.loads(result.read_text())
        same = torch.equal(torch.load(Path(tmp) / "inram/result.pt"), torch.load(Path(tmp) / "offload/result.pt"))
    res["same_logits"] = bool(same)
    res["loadavg_end"] = os.getloadavg()  # other jobs on the box slow the timings down
    above = {m: v["peak_rss_gib"] - v["base_rss_gib"] for m, v in res["modes"].items()}
    res["offload_over_inram"] = above["offload"] / above["inram"]
    anon = {m: v["peak_anon_gib"] - v["base_anon_gib"] for m, v in res["modes"].items()}
    res["offload_over_inram_anon"] = anon["offload"] / anon["inram"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
