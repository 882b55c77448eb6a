"""qtta-plugins adapter for torchao (pt2e graphs for CNNs, QAT fake-quant for Linear-only models).

Importing this package does not import torchao: the backend is imported on first real use.
"""

BACKEND = "torchao"
