"""`integrations.loading`: a checkpoint loads into the class with its LM head (issue 32 S3)."""

from transformers import AutoModelForCausalLM, DiffusionGemmaForBlockDiffusion, LlamaForCausalLM

from optimum_fair.integrations.loading import load_pretrained, model_class
from tests.conftest import tiny_llada, tiny_llama_config
from tests.pipeline.test_diffusion_gemma import tiny_gemma


def test_the_class_the_checkpoint_names_else_an_auto_class_with_a_head():
    named = tiny_llama_config(architectures=["LlamaForCausalLM"])
    assert model_class(named) is LlamaForCausalLM
    assert model_class(tiny_llama_config()) is AutoModelForCausalLM  # no architectures: not AutoModel
    gemma = tiny_gemma().config  # in memory: no architectures yet
    assert model_class(gemma)._model_mapping[type(gemma)] is DiffusionGemmaForBlockDiffusion
    native = tiny_llada(16, 3).config  # architectures LLaDAModelLM: not a transformers class
    assert model_class(native) is AutoModelForCausalLM


def test_diffusion_gemma_and_native_folders_reload_with_their_heads(tmp_path):
    gemma, llada = tiny_gemma(), tiny_llada(16, 3)
    gemma.save_pretrained(tmp_path / "gemma")
    llada.save_pretrained(tmp_path / "llada")
    assert type(load_pretrained(str(tmp_path / "gemma"))) is DiffusionGemmaForBlockDiffusion
    assert type(load_pretrained(str(tmp_path / "llada"))) is type(llada)


def test_without_import_optimum_fair_a_checkpoint_fails_loudly_and_its_card_says_why(tmp_path):
    """issue 32 W6, judged right as it is: transformers words the error for a model type it does not know (or
    a quant_method it does not know) and we cannot add to it, so the card's load snippet (what a Hub user reads)
    starts with `import optimum_fair`, and no process without it gets a model, silently or not."""
    import subprocess
    import sys

    from transformers import LlamaForCausalLM

    from optimum_fair import FairCalibConfig, quantize, save_quantized

    rtn = dict(rounding="rtn", transform="none", weighting="uniform", a_bits=16)
    save_quantized(quantize(tiny_llada(100, 3), FairCalibConfig(**rtn)), tmp_path / "llada")  # with the card
    quantize(LlamaForCausalLM(tiny_llama_config()), FairCalibConfig(**rtn)).save_pretrained(tmp_path / "llama")
    card = (tmp_path / "llada" / "README.md").read_text()
    assert "## How to load\n\n```python\nimport optimum_fair  # registers fair_calib" in card
    script = ("import sys\nfrom transformers import AutoModel\nfor name in sys.argv[1:]:\n    try:\n"
              "        AutoModel.from_pretrained(name)\n        print('LOADED', name)\n"
              "    except Exception as err:\n        print('REFUSED', type(err).__name__, repr(str(err)[:120]))\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "llada"), str(tmp_path / "llama")],
                         capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["REFUSED", "ValueError"], ["REFUSED", "RuntimeError"]], run
    assert "model type `llada`" in lines[0] and "Unknown quantization type, got fair_calib" in run.stderr
