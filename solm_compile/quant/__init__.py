"""Low-bit weights: one block format (``BlockQuant``), read losslessly from GGUF or made by round-to-nearest,
and the ONNX rewrite that makes an artifact read those bytes (``MatMulNBits`` / ``GatherBlockQuantized``)."""
