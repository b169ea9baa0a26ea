"""Block-by-block one-shot pruning, as SparseGPT and Wanda process a decoder LLM.

1. The calibration samples run through the embeddings only: the first decoder block is
   wrapped so that its inputs (hidden states and the keyword arguments the model passes
   every block: attention mask, position ids, rotary embeddings) are recorded, and the
   forward stops there.
2. For each block in turn: run every sample through it with a hook on each prunable
   ``nn.Linear`` (the pruner accumulates its input statistics), prune the Linears, run
   the samples through the pruned block again and pass those outputs to the next block.

Memory is one block plus the activations of the calibration set; with
``model.offload=true`` the model stays on the CPU and each block visits the GPU in turn.
``calibration.blockwise=false`` is the reference implementation: the whole model on the
device and each block's inputs recomputed from the embeddings through the already
pruned blocks (the same masks, more time and memory; ``scripts/bench_llm_memory.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pruneflow.errors import UserError
from pruneflow.masking import _matches
from pruneflow.methods.oneshot import LayerPruner, OneShotMethod
from pruneflow.utils import progress

log = logging.getLogger("pruneflow")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (``model.layers`` for LLaMA/Mistral/Qwen,
    ``model.decoder.layers`` for OPT): the list with ``num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return name, module
    raise UserError(f"Could not find the decoder blocks of {type(model).__name__} (an nn.ModuleList of num_hidden_layers={n} blocks).")


def block_linears(block: nn.Module, include: list[str] | None, exclude: list[str] | None) -> dict[str, nn.Linear]:
    """The prunable Linears of one block, by name inside it (``self_attn.q_proj``...)."""
    out = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and (not include or _matches(name, include)) and not (exclude and _matches(name, exclude)):
            out[name] = module
    return out


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first block: records its inputs and stops the forward."""

    def __init__(self, block: nn.Module, store: Callable[[torch.Tensor, dict[str, Any]], None]) -> None:
        super().__init__()
        self.block = block
        self.store = store

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the model may read block attributes (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        self.store(hidden_states, kwargs)
        raise _Stop


def _first_output(out: Any) -> torch.Tensor:  # noqa: ANN401 - LLaMA returns a tensor, OPT a tuple
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj: Any, device: torch.device) -> Any:  # noqa: ANN401
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class BlockPruner:
    """Drives a :class:`OneShotMethod` over a causal LM's decoder blocks."""

    def __init__(self, model: nn.Module, method: OneShotMethod, device: torch.device, offload: bool,
                 include: list[str] | None = None, exclude: list[str] | None = None) -> None:
        self.model = model
        self.method = method
        self.device = device
        self.offload = offload and device.type != "cpu"
        self.include, self.exclude = include, exclude
        self.blocks_name, self.blocks = decoder_blocks(model)
        self.dtype = next(model.parameters()).dtype

    # -- placement -----------------------------------------------------------------------
    def _parent(self) -> tuple[nn.Module, str]:
        parent_name, _, attr = self.blocks_name.rpartition(".")
        return (self.model.get_submodule(parent_name) if parent_name else self.model), attr

    def place_outside_blocks(self, device: torch.device) -> None:
        """Move everything but the decoder blocks (embeddings, rotary, final norm, head)."""
        parent, attr = self._parent()
        setattr(parent, attr, nn.ModuleList())
        try:
            self.model.to(device)
        finally:
            setattr(parent, attr, self.blocks)

    def linears(self, index: int) -> dict[str, nn.Linear]:
        return block_linears(self.blocks[index], self.include, self.exclude)

    def named_linears(self) -> dict[str, nn.Linear]:
        """Every prunable Linear of every block, by its module name in the model."""
        return {f"{self.blocks_name}.{i}.{n}": lin for i in range(len(self.blocks)) for n, lin in self.linears(i).items()}

    def weight_names(self, index: int) -> dict[str, str]:
        """Block-local Linear name -> the weight's name in the model's state dict."""
        return {n: f"{self.blocks_name}.{index}.{n}.weight" for n in self.linears(index)}

    # -- calibration inputs ----------------------------------------------------------------
    @torch.no_grad()
    def capture(self, samples: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The first block's inputs for every sample: (nsamples, seqlen, hidden), kwargs."""
        if self.offload:
            self.place_outside_blocks(self.device)
            self.blocks[0].to(self.device)
        n, seqlen = samples.shape
        hidden = self.model.config.hidden_size
        inps = torch.zeros(n, seqlen, hidden, dtype=self.dtype, device=self.device)
        state: dict[str, Any] = {"i": 0, "kwargs": None}

        def store(h: torch.Tensor, kwargs: dict[str, Any]) -> None:
            inps[state["i"]] = h[0]
            state["i"] += 1
            if state["kwargs"] is None:
                state["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}

        first = self.blocks[0]
        self.blocks[0] = _Catcher(first, store)
        try:
            for j in range(n):
                try:
                    self.model(input_ids=samples[j:j + 1].to(self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            self.blocks[0] = first
        if self.offload:
            self.blocks[0].to("cpu")
            self.place_outside_blocks(torch.device("cpu"))
        kwargs = state["kwargs"] or {}
        kwargs["use_cache"] = False
        return inps, kwargs

    @torch.no_grad()
    def forward_block(self, index: int, inps: torch.Tensor, kwargs: dict[str, Any], out: torch.Tensor | None = None) -> torch.Tensor:
        block = self.blocks[index]
        out = torch.empty_like(inps) if out is None else out
        for j in range(inps.shape[0]):
            out[j] = _first_output(block(inps[j:j + 1], **kwargs))[0]
        return out

    # -- pruning ------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, index: int, inps: torch.Tensor | None, kwargs: dict[str, Any], method: OneShotMethod) -> dict[str, LayerPruner]:
        """Pruners of ``method`` for one block's Linears, fed the block's inputs ``inps``."""
        pruners = {name: method.layer_pruner(lin) for name, lin in self.linears(index).items()}
        if any(p.needs_inputs for p in pruners.values()):
            handles = [
                lin.register_forward_hook(lambda _m, args, _out, p=pruners[name]: p.add_batch(args[0].detach()))
                for name, lin in self.linears(index).items()
            ]
            try:
                self.forward_block(index, inps, kwargs)
            finally:
                for h in handles:
                    h.remove()
        return pruners

    @torch.no_grad()
    def prune_block(self, index: int, inps: torch.Tensor | None, kwargs: dict[str, Any], sparsity: float) -> None:
        """Prune one block's Linears from the statistics of its inputs ``inps``."""
        for name, lin in self.linears(index).items():
            self.method.check_layer(f"{self.blocks_name}.{index}.{name}", lin)
        for p in self.collect(index, inps, kwargs, self.method).values():
            p.prune(sparsity)
            p.free()

    def _through_blocks(self, samples: torch.Tensor, desc: str) -> Iterator[tuple[int, torch.Tensor, dict[str, Any]]]:
        """Each block's calibration inputs in turn (the block on the device); once the
        caller is done with block i, its outputs from its current weights become block
        i+1's inputs."""
        inps, kwargs = self.capture(samples)
        kwargs = _to(kwargs, self.device)
        outs = torch.empty_like(inps)
        for i in progress(range(len(self.blocks)), desc=desc):
            if self.offload:
                self.blocks[i].to(self.device)
            yield i, inps, kwargs
            self.forward_block(i, inps, kwargs, outs)
            inps, outs = outs, inps
            if self.offload:
                self.blocks[i].to("cpu")
                torch.cuda.empty_cache()

    @torch.no_grad()
    def dense_pass(self, samples: torch.Tensor, method: OneShotMethod, visit: Callable[[int, dict[str, LayerPruner]], None]) -> None:
        """Feed the calibration set through the unpruned blocks, handing each block's
        pruners (their statistics collected) to ``visit`` (OWL's outlier count)."""
        for i, inps, kwargs in self._through_blocks(samples, "statistics"):
            pruners = self.collect(i, inps, kwargs, method)
            visit(i, pruners)
            for p in pruners.values():
                p.free()

    def run(self, samples: torch.Tensor, sparsities: list[float], start: int = 0,
            on_block_done: Callable[[int], None] | None = None, blockwise: bool = True) -> None:
        """Prune blocks ``start..`` (blocks before ``start`` are already pruned, e.g. loaded
        from a checkpoint: they are only run forward)."""
        if not blockwise:
            return self.run_whole(samples, sparsities, start, on_block_done)
        for i, inps, kwargs in self._through_blocks(samples, "prune blocks"):
            if i >= start:
                self.prune_block(i, inps, kwargs, sparsities[i])
                if on_block_done is not None:
                    on_block_done(i)
        return None

    @torch.no_grad()
    def run_data_free(self, sparsities: list[float], start: int = 0, on_block_done: Callable[[int], None] | None = None) -> None:
        """Prune blocks ``start..`` of a method whose pruners read no inputs (magnitude):
        no calibration windows are captured or run forward."""
        if self.method.pruner_class.needs_inputs:
            raise ValueError(f"method={self.method.name} prunes from calibration inputs; use run()")
        for i in progress(range(start, len(self.blocks)), desc="prune blocks"):
            if self.offload:
                self.blocks[i].to(self.device)
            self.prune_block(i, None, {}, sparsities[i])
            if on_block_done is not None:
                on_block_done(i)
            if self.offload:
                self.blocks[i].to("cpu")
                torch.cuda.empty_cache()

    @torch.no_grad()
    def run_whole(self, samples: torch.Tensor, sparsities: list[float], start: int = 0,
                  on_block_done: Callable[[int], None] | None = None) -> None:
        """Reference: every block's inputs recomputed by the whole model on the device."""
        self.model.to(self.device)
        for i in progress(range(start, len(self.blocks)), desc="prune blocks (whole model)"):
            inps: list[torch.Tensor] = []
            kwargs: dict[str, Any] = {}
            block = self.blocks[i]

            def grab(_m: nn.Module, args: tuple, kw: dict[str, Any], inps: list = inps, kwargs: dict = kwargs) -> None:
                inps.append(args[0] if args else kw["hidden_states"])
                if not kwargs:
                    kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states", "cache", "past_key_values")})
                raise _Stop

            handle = block.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                for j in range(samples.shape[0]):
                    try:
                        self.model(input_ids=samples[j:j + 1].to(self.device), use_cache=False)
                    except _Stop:
                        pass
            finally:
                handle.remove()
            kwargs["use_cache"] = False
            self.prune_block(i, torch.cat(inps), kwargs, sparsities[i])
            if on_block_done is not None:
                on_block_done(i)
