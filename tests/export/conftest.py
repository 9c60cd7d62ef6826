"""Models the export tests share."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

import optimum_fair
from optimum_fair import FairCalibConfig, save_quantized


@pytest.fixture(scope="session")
def q4_0(tmp_path_factory):
    """(folder, model): the shipped model calibrated (GPTQ, uniform) in Q4_0's own grid, loaded in fp32:
    its scales are still fp16 values, so the GGUF holds them exactly."""
    config = FairCalibConfig(rounding="gptq", weighting="uniform", num_probes=8, num_samples=8, gguf_type="Q4_0")
    model = AutoModel.from_pretrained(optimum_fair.DEFAULT_MODEL, dtype=torch.float32, quantization_config=config)
    folder = tmp_path_factory.mktemp("exports") / "q4_0"
    save_quantized(model, folder)  # the folder with its tokenizer (GGUF needs it)
    return folder, model
