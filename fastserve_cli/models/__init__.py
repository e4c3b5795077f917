"""The one model loader (fp32, quantized, head-pruned; torch and ONNX), measurement and kernels."""
