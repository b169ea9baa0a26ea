"""SparseGPT (Frantar & Alistarh, ICML 2023): one-shot pruning with an OBS weight update.

From the calibration inputs of a layer, ``H = 2/S * sum_s X_s X_s^T`` (running mean over
the S samples). Dead inputs (``H[j, j] = 0``) get ``H[j, j] = 1`` and their weights are
zeroed; ``H`` is dampened by ``dampening * mean(diag H)`` and the upper Cholesky factor
of its inverse drives the update. Columns are processed in blocks of ``block_size``:
the unstructured mask of a block removes the ``sparsity`` fraction of the block with the
lowest ``w^2 / [H^-1]_jj^2`` (one threshold over the block's rows and columns); N:M
picks the M-N lowest of each M columns per row. Each pruned column's error is spread
over the later columns of the block, then lazily over the remaining blocks. As the
authors' ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt, sparsegpt.py), as also copied
in Wanda's repository.
"""

from __future__ import annotations

import torch

from pruneflow.errors import invalid
from pruneflow.methods.oneshot import LayerPruner, OneShotMethod


class SparseGPTPruner(LayerPruner):
    def __init__(self, layer: torch.nn.Linear, method: SparseGPT) -> None:
        super().__init__(layer, method)
        cols = layer.in_features
        self.H = torch.zeros(cols, cols, device=layer.weight.device, dtype=torch.float32)
        self.samples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).t().float()  # (in_features, tokens)
        self.H *= self.samples / (self.samples + batch)
        self.samples += batch
        x = (2 / self.samples) ** 0.5 * x
        self.H += x @ x.t()

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        method: SparseGPT = self.method  # type: ignore[assignment]
        W = self.layer.weight.data.clone().float()
        rows, cols = W.shape
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = method.dampening * torch.mean(torch.diag(H))
        idx = torch.arange(cols, device=W.device)
        H[idx, idx] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        nm = method.pattern
        Q = torch.zeros_like(W)
        bs = method.block_size
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            if nm is None:
                tmp = W1**2 / d.reshape(1, -1) ** 2
                # an OWL block at sparsity >= 1 is pruned whole (theirs: an IndexError)
                thresh = torch.sort(tmp.flatten())[0][min(int(tmp.numel() * sparsity), tmp.numel() - 1)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(count):
                w = W1[:, i]
                if nm is not None and i % nm[1] == 0:
                    n, m = nm
                    tmp = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        self.layer.weight.data = Q.reshape(self.layer.weight.shape).to(self.layer.weight.dtype)

    def free(self) -> None:
        del self.H


class SparseGPT(OneShotMethod):
    name = "sparsegpt"
    pruner_class = SparseGPTPruner

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.block_size = cfg.get("block_size", 128)
        self.dampening = cfg.get("dampening", 0.01)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise invalid("method.block_size", self.block_size, "an integer >= 1 (columns updated together; the authors use 128)")
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float)) or not self.dampening > 0:
            raise invalid("method.dampening", self.dampening, "a number > 0 (fraction of the mean Hessian diagonal added; the authors use 0.01)")
        if self.pattern is not None and self.block_size % self.pattern[1]:
            raise invalid("method.block_size", self.block_size, f"a multiple of M={self.pattern[1]}",
                          "N:M groups must not straddle two column blocks.")

    def summary(self) -> dict:
        return {**super().summary(), "block_size": self.block_size, "dampening": self.dampening}
