"""`optimum-fair`: quantize, build a prior, evaluate, push and sample diffusion LMs from the shell.

    optimum-fair quantize [MODEL] --output-dir out/w4a4 --w-bits 4 --a-bits 4 --rounding gptq [--eval]
    optimum-fair prior    [MODEL] --output-dir out/prior --num-probes 512
    optimum-fair eval     MODEL [--compare OTHER] [--base FP_MODEL] [--texts wiki-val lee]
    optimum-fair eval     MODEL --tasks fair_offline [--include-path DIR] [--mc-num 128] [--limit K]
    optimum-fair push     out/w4a4 me/llada-w4a4 [--overwrite]
    optimum-fair export   out/w4a16 --format gguf --output out/w4a16.gguf
    optimum-fair generate [MODEL] "The history of" [--algorithm llada|dream|llada2]

MODEL is a local folder or a Hub repo id; left out, the small LLaDA teacher bundled with the package
(`optimum_fair.DEFAULT_MODEL`). Every `FairCalibConfig` field is a flag of `quantize` and `prior`,
spelled with dashes (``w_bits`` -> ``--w-bits``). The same subcommands run as ``optimum-cli fair ...``.
A failure prints one line ``optimum-fair <command>: error: <reason>`` to stderr and exits 1 (2 for a
usage error); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from optimum_fair_cli import COMMANDS, PROG, subcommands, top_parser  # the console script's light front

from . import actions
from .flags import add_config_flags, add_eval_flags


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")


def _model_flags(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        parser.add_argument("model", nargs="?", default=None,
                            help="local folder or Hub repo id (default: the bundled teacher, DEFAULT_MODEL)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help="dtype to load the model in (default: float32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "reference", "int8_mm", "int4_weight"],
                        help="what packed layers compute with (default auto: an integer kernel where the dtype "
                             "allows; int4_weight runs W4A16 in bfloat16 whatever --dtype is)")


def _hub_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of a non-empty output folder / Hub repo")


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help=COMMANDS["quantize"], description=COMMANDS["quantize"])
    _model_flags(p)
    p.add_argument("--output-dir", default=None, help="folder to write (weights, tokenizer, prior/, README.md)")
    _hub_flags(p)
    p.add_argument("--eval", action="store_true",
                   help="evaluate the FP model and the quantized one; the table goes into the model card")
    p.add_argument("--all-metrics", action="store_true", help="print every metric, not just the headline ones")
    _common(p)
    p.set_defaults(config_flag_names=add_config_flags(p), eval_flag_names=add_eval_flags(p, prefix="eval_"))


def _add_prior(sub) -> None:
    p = sub.add_parser("prior", help=COMMANDS["prior"], description=COMMANDS["prior"])
    _model_flags(p)
    p.add_argument("--output-dir", required=True, help="folder for prior.safetensors and prior.json")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output folder")
    _common(p)
    p.set_defaults(config_flag_names=add_config_flags(p))


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help=COMMANDS["eval"], description=COMMANDS["eval"])
    _model_flags(p)
    p.add_argument("--compare", default=None, help="a second model to show side by side")
    p.add_argument("--base", default=None,
                   help="the full-precision teacher (default: whichever evaluated model is not quantized)")
    p.add_argument("--json", default=None, help="also write every metric to this JSON file")
    p.add_argument("--all-metrics", action="store_true", help="print every metric, not just the headline ones")
    _task_flags(p.add_argument_group("lm-eval tasks (pip install -e \".[eval]\"); with --tasks, runs these instead"))
    _common(p)
    p.set_defaults(eval_flag_names=add_eval_flags(p))


def _task_flags(group) -> None:
    group.add_argument("--tasks", default=None,
                       help="comma-separated lm-eval tasks or tags, e.g. fair_offline or arc_easy,piqa (the offline "
                            "fair_lee_* tasks are always included)")
    group.add_argument("--include-path", default=None, help="a folder of further lm-eval task YAMLs")
    group.add_argument("--mc-num", type=int, default=128, help="Monte-Carlo draws per loglikelihood (default: 128)")
    group.add_argument("--batch-size", type=int, default=32,
                       help="draws per forward / prompts per generation batch; divides --mc-num (default: 32)")
    group.add_argument("--limit", type=float, default=None, help="at most this many items per task (<1: a fraction)")
    group.add_argument("--output-path", default=None, help="write lm-eval's results JSON under this folder")
    group.add_argument("--model-args", default="",
                       help="more backend model_args, lm-eval style: cfg=0.5,seed=1,gen_length=256,...")


def _add_push(sub) -> None:
    p = sub.add_parser("push", help=COMMANDS["push"], description=COMMANDS["push"])
    p.add_argument("output_dir", help="folder written by `optimum-fair quantize` (or save_quantized)")
    p.add_argument("repo_id", help="Hub repo id, 'namespace/name' (created if missing)")
    _hub_flags(p)
    p.add_argument("--commit-message", default="Upload FAIR-Calib quantized model", help="commit message")
    _common(p)


def _add_export(sub) -> None:
    from ..export import FORMATS

    p = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"])
    p.add_argument("output_dir", metavar="DIR", help="folder written by `optimum-fair quantize` (or save_quantized)")
    p.add_argument("--format", required=True, choices=FORMATS, help="gguf: one file; compressed-tensors: a folder")
    p.add_argument("--output", required=True, help="the .gguf file or the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--type", dest="gguf_type", metavar="TYPE", default=None,
                   help="GGUF file type, as llama-quantize names it: Q4_0 / Q8_0 / Q4_K_M / Q5_K_M / Q6_K / IQ4_NL "
                        "/ IQ4_XS (the type the model was calibrated for; embedding and head as llama.cpp's mix) or "
                        "F32 / F16 / BF16 (an unquantized model); default: the codes as they are, every float "
                        "tensor F32")
    _common(p)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help=COMMANDS["generate"], description=COMMANDS["generate"])
    p.add_argument("model", nargs="?", default=None, help="local folder or Hub repo id (default: DEFAULT_MODEL)")
    p.add_argument("prompt", help="the prompt text")
    _model_flags(p, positional=False)
    p.add_argument("--algorithm", choices=["llada", "dream", "llada2"], default="llada",
                   help="llada: semi-autoregressive low-confidence blocks; dream: Dream's schedule; llada2: "
                        "block-causal attention, threshold commits (default: llada)")
    p.add_argument("--gen-length", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=None, help="LLaDA block length (default: min(32, gen-length))")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when temperature > 0 (default: 0)")
    p.add_argument("--threshold", type=float, default=None,
                   help="parallel decoding: also commit every masked position of the block whose proposal has "
                        "probability >= this, in (0, 1] (Fast-dLLM; llada2: its own rule's threshold)")
    p.add_argument("--factor", type=float, default=None, help="parallel decoding by Fast-dLLM's factor rule (> 0)")
    p.add_argument("--cache", choices=["none", "prefix", "dual"], default="none",
                   help="Fast-dLLM's approximate KV cache (LLaDA, Dream, LLaDA-MoE; default: none)")
    _common(p)


def add_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the subcommands to ``parser`` (the console script's, or optimum-cli's `fair` parser)."""
    sub = subcommands(parser)
    for add in (_add_quantize, _add_prior, _add_eval, _add_push, _add_export, _add_generate):
        add(sub)
    return parser


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The `optimum-fair` argument parser (``prog``: the name shown in usage lines)."""
    return add_commands(top_parser(prog))


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments; a failure becomes one line on stderr and exit code 1 (unless --debug)."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler = {"quantize": actions.run_quantize, "prior": actions.run_prior, "eval": actions.run_eval,
               "push": actions.run_push, "export": actions.run_export,
               "generate": actions.run_generate}[args.fair_command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.fair_command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure: one line, no traceback
        if args.debug:
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"{PROG} {args.fair_command}: error: {reason}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `optimum-fair` console script."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
