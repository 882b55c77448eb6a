"""Quick start: quantize a CNN with torchao at W4A4 and adapt it along a continual corruption stream.

python examples/quickstart_torchao.py
"""

import torch

import qtta_plugins
from qtta_plugins.data import continual_stream, load_source
from qtta_plugins.models import train_source_model

torch.set_num_threads(2)

model = train_source_model("bncnn", "digits")  # your float model (here: trained once, then cached)
train, _ = load_source("digits")
calib = [train.x[i : i + 64] for i in range(0, 512, 64)]
qmodel = qtta_plugins.quantize(model, backend="torchao", bits="w4a4", calib=calib)

stream = continual_stream("digits", severity=5)  # batches with .x, .y, .domain: 15 corruptions
run = qtta_plugins.adapt(qmodel, stream)  # backend detected; Tent, since gradients can flow
print(f"method {run.config.method}: mean error {run.errors()['mean']:.1f}%")
print(type(run.model).__name__, "- still a torchao pt2e model;", qtta_plugins.quant_view(run.model))
run.save("qtta_state.pt")  # ...and later run.load("qtta_state.pt"), or run.reset()
