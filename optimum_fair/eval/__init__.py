"""How good a (quantized) diffusion LM is: masked NLL and decoding-stability metrics (`evaluate`,
`metrics`), and text generation with the tracing samplers (`generation`).

Nothing is imported here, so `eval.metrics` stays importable without transformers.
"""
