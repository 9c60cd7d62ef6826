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
