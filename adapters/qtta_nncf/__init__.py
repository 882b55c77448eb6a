"""qtta-plugins adapter for NNCF (``nncf.quantize`` on PyTorch models: hook-based fake quantization).

Importing this package does not import NNCF: the backend is imported on first real use.
"""

BACKEND = "nncf"
