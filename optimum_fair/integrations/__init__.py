"""Glue to the libraries optimum-fair plugs into: transformers' quantization API (`transformers`) and
the adapter that makes a quantized model's own save / push publish it whole (`publishing`)."""
