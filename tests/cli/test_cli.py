"""The `optimum-fair` CLI on a tiny LLaDA saved to disk: each subcommand in-process, --help as a real
console-script subprocess, and `optimum-cli fair` through the plugin file."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModel

from optimum_fair import FairCalibConfig, calibration_result, quantize
from optimum_fair.cli import build_parser, main
from optimum_fair.cli.flags import config_from_args
from optimum_fair.cli.main import COMMANDS
from optimum_fair.eval.generation import generate
from tests import hub_server
from tests.conftest import char_tokenizer, tiny_llada

hub = hub_server.hub  # the loopback Hub fixture
SMALL = dict(num_probes=8, num_samples=8, seq_len=32, window=16, block_length=8, batch_size=4, epochs=2,
             dataset="lee", rounding="gptq", transform="hadamard")
FLAGS = [x for k, v in SMALL.items() for x in (f"--{k.replace('_', '-')}", str(v))]
EVAL = ["--texts", "lee", "--num-prompts", "2", "--prompt-len", "16", "--gen-length", "16", "--block-length", "8",
        "--nll-samples", "4", "--seq-len", "32", "--post-commit-prompts", "1"]
QUANT_EVAL = [f"--eval-{a[2:]}" if a.startswith("--") else a for a in EVAL]
X = torch.randint(4, 90, (2, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    tok = char_tokenizer()
    path = tmp_path_factory.mktemp("cli") / "fp"
    tiny_llada(len(tok), tok.mask_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def q_dir(fp_dir):
    out = fp_dir.parent / "q"
    assert main(["quantize", str(fp_dir), "--output-dir", str(out), *FLAGS, "--eval", *QUANT_EVAL]) == 0
    return out


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def test_every_config_field_is_a_flag_and_parses():
    parser = build_parser()
    for command in ("quantize", "prior"):
        sub = parser._subparsers._group_actions[0].choices[command]
        dests = {a.dest for a in sub._actions}
        assert {f.name for f in dataclasses.fields(FairCalibConfig)} - dests == {"quant_method"}, command
    args = parser.parse_args(["quantize", "--w-bits", "8", "--a-bits", "8", "--no-strict-prior", "--window", "none",
                              "--modules-to-not-convert", "a", "b", "--rounding", "gptq"])
    config = config_from_args(args, args.config_flag_names)
    assert (config.w_bits, config.a_bits, config.strict_prior, config.window) == (8, 8, False, None)
    assert config.modules_to_not_convert == ["a", "b"] and config.rounding.value == "gptq"
    assert config.num_probes == FairCalibConfig().num_probes  # unset flags keep the dataclass default


def test_quantize_matches_the_python_api_and_writes_a_card(q_dir, fp_dir):
    tok = char_tokenizer()
    direct = quantize(AutoModel.from_pretrained(fp_dir), FairCalibConfig(**SMALL), tokenizer=tok)
    assert torch.equal(_logits(AutoModel.from_pretrained(q_dir)), _logits(direct))
    card = (q_dir / "README.md").read_text()
    assert "| flip_rate | 0 |" in card  # the FP column of the measured-quality table
    assert (q_dir / "prior" / "prior.json").is_file() and (q_dir / "tokenizer.json").is_file()


def test_failures_are_one_line_and_happen_before_loading(fp_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["quantize", str(fp_dir), "--output-dir", str(out), "--w-bits", "3"]) == 1
    err = capsys.readouterr().err
    assert err == "optimum-fair quantize: error: w_bits must be one of [4, 8], got 3\n"
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["quantize", str(fp_dir), "--output-dir", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "hi"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ValueError, match="w_bits"):
        main(["quantize", str(fp_dir), "--output-dir", str(tmp_path / "o2"), "--w-bits", "3", "--debug"])
    with pytest.raises(SystemExit) as usage:
        main(["quantize", "--rounding", "nearest"])
    assert usage.value.code == 2


def test_prior_equals_the_one_quantize_builds(fp_dir, tmp_path):
    from optimum_fair.scoring.prior import PositionPrior

    assert main(["prior", str(fp_dir), "--output-dir", str(tmp_path / "prior"), *FLAGS]) == 0
    tok = char_tokenizer()
    model = quantize(AutoModel.from_pretrained(fp_dir), FairCalibConfig(**SMALL), tokenizer=tok)
    built = calibration_result(model).prior
    assert torch.equal(PositionPrior.load(tmp_path / "prior").weights, built.weights)
    assert main(["prior", str(fp_dir), "--output-dir", str(tmp_path / "p2"), "--weighting", "uniform"]) == 1


def test_eval_compares_side_by_side(q_dir, fp_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", str(q_dir), "--compare", str(fp_dir), *EVAL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| metric | {q_dir} | {fp_dir} |" in printed
    rows = json.loads(out.read_text())
    assert rows[str(fp_dir)]["flip_rate"] == 0.0 and rows[str(fp_dir)]["agreement"] == 1.0
    assert rows[str(q_dir)]["flip_rate"] > 0.0
    assert rows[str(q_dir)]["lee/decisions"] == 2 * 16


def test_push_and_quantize_push_to_hub(hub, q_dir, fp_dir, tmp_path, capsys):
    assert main(["push", str(q_dir), "tester/cli"]) == 0
    assert "README.md" in hub.files("tester/cli") and "prior/prior.json" in hub.files("tester/cli")
    assert main(["push", str(q_dir), "tester/cli"]) == 1
    assert "already has files" in capsys.readouterr().err
    assert main(["quantize", str(fp_dir), "--push-to-hub", "tester/cli-q", *FLAGS]) == 0
    remote, local = hub.files("tester/cli-q")["model.safetensors"], (q_dir / "model.safetensors").read_bytes()
    # a deterministic run: the same tensors and metadata. Not the same bytes: safetensors writes its header's
    # metadata keys in hash-map order, which differs between writes.
    assert _safetensors_header(remote) == _safetensors_header(local)
    pushed, saved = safetensors.torch.load(remote), safetensors.torch.load(local)
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)


def _safetensors_header(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size])


def test_generate_prints_the_sampler_output(q_dir, capsys):
    assert main(["generate", str(q_dir), "Hello", "--gen-length", "16", "--block-length", "8"]) == 0
    tok = char_tokenizer()
    expected = generate(AutoModel.from_pretrained(q_dir), tok, "Hello", gen_length=16, block_length=8)
    assert capsys.readouterr().out == expected + "\n"


def test_console_script_help_lists_every_command():
    script = shutil.which("optimum-fair", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                os.environ.get("PATH", "")]))
    assert script, "the optimum-fair console script is not installed (pip install -e .)"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in COMMANDS)


def test_optimum_cli_discovers_the_plugin(monkeypatch, capsys):
    """optimum-cli finds optimum/commands/register/optimum_fair.py (repo root on sys.path here; the
    installed package ships it) and `optimum-cli fair push --help` reaches this CLI's parser."""
    from optimum.commands import optimum_cli

    monkeypatch.setattr(sys, "argv", ["optimum-cli", "fair", "push", "--help"])
    with pytest.raises(SystemExit) as done:
        optimum_cli.main()
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: optimum-cli fair push [-h]")
    plugin = sys.modules["optimum.commands.register.optimum_fair"]
    for name, text in COMMANDS.items():  # the plugin's static help lists the same commands
        assert f"  {name:<9} {text}" in plugin._USAGE


def test_quantize_keeps_the_lm_head_of_a_transformers_family(tmp_path, tiny_llama):
    """A LlamaForCausalLM folder loads as LlamaForCausalLM (not the headless LlamaModel): the saved checkpoint
    keeps lm_head.weight and its architectures (issue 32 S3)."""
    src, out = tmp_path / "llama", tmp_path / "q"
    tiny_llama.save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    assert main(["quantize", str(src), "--output-dir", str(out), "--rounding", "rtn", "--transform", "none",
                 "--a-bits", "16", "--weighting", "uniform", "--dataset", "lee"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    saved = safetensors.torch.load_file(out / "model.safetensors")
    assert torch.equal(saved["lm_head.weight"], tiny_llama.lm_head.weight)


def test_kernel_flag_puts_the_packed_layers_on_the_named_kernel(tmp_path):
    # issue 32 N3: a W4A16 model loaded in float32 stays on the reference path under "auto"; --kernel
    # int4_weight asks for torch's int4 kernel (bfloat16 compute) by name
    from optimum_fair.cli.actions import load_model
    from optimum_fair.nn import FairLinear

    tok = char_tokenizer()
    model = tiny_llada(len(tok), tok.mask_token_id)
    quantize(model, FairCalibConfig(rounding="rtn", transform="none", weighting="uniform", w_bits=4, a_bits=16,
                                    group_size=32), tokenizer=tok)
    model.save_pretrained(tmp_path / "w4a16")
    tok.save_pretrained(tmp_path / "w4a16")
    for kernel, expected in (("auto", "reference"), ("int4_weight", "int4_weight"), ("reference", "reference")):
        loaded, _ = load_model(str(tmp_path / "w4a16"), "float32", "cpu", kernel)
        assert {m.kernel for m in loaded.modules() if isinstance(m, FairLinear)} == {expected}, kernel
    args = build_parser().parse_args(["generate", str(tmp_path / "w4a16"), "Hi", "--kernel", "int4_weight"])
    assert args.kernel == "int4_weight"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "Hi", "--kernel", "fast"])
