"""qtta-plugins adapter for Brevitas (eager module-swap quantization with learnable scales).

Importing this package does not import Brevitas: the backend is imported on first real use.
"""

BACKEND = "brevitas"
