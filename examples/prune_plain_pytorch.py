"""Prune a model inside your own PyTorch loop with a pruneflow method (here SEVEN).

    python examples/prune_plain_pytorch.py [method] [sparsity]      # e.g. movement 0.8
"""

import sys

import timm
import torch
from sklearn.datasets import load_digits

import pruneflow

method, sparsity = (sys.argv[1:] + ["seven", "0.7"][len(sys.argv) - 1 :])[:2]
torch.manual_seed(0)
digits = load_digits()  # scikit-learn's bundled 8x8 digits: real data, no download
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
y = torch.tensor(digits.target)
model = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

steps, prune_from, prune_steps = 400, 200, 150   # dense, then pruning on the cubic schedule, then frozen masks
pruner = pruneflow.methods.create(method, sparsity=float(sparsity), steps=prune_steps)
for step in range(steps):
    if step == prune_from:
        pruner.attach(model)  # every Linear of the encoder blocks
        for group in pruner.param_groups():  # movement pruning's trainable scores (other methods: none)
            optimizer.add_param_group(group)
    i = torch.randint(0, len(y), (64,))
    loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
    extra = pruner.extra_loss() if prune_from <= step < prune_from + prune_steps else None
    (loss if extra is None else loss + extra).backward()
    optimizer.step()
    if prune_from <= step < prune_from + prune_steps:
        pruner.after_optimizer_step(step - prune_from)  # reads this step's gradients: before zero_grad
    if step == prune_from + prune_steps - 1:
        model = pruner.end()  # masks frozen from here on
    optimizer.zero_grad()

model = pruner.remove()  # plain weights, zeros in place
model.eval()
with torch.no_grad():
    accuracy = (model(x).argmax(-1) == y).float().mean().item()
report = pruneflow.sparsity_report(model)
print(f"{method}: sparsity {report['prunable']['sparsity']:.4f} of {report['prunable']['total']} prunable weights, train accuracy {accuracy:.3f}")
