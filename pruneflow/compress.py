"""Paired-module masks and physical compression of Transformer blocks (SPP).

Three *paired* inner dimensions can shrink without changing any block's output
shape (Ding et al., ICLR 2025):

- ``qk``: the query–key inner dimension (rows of W_q and W_k; scores are
  sum_d q_d k_d, so dropping d from both removes one term),
- ``vo``: the value–output inner dimension (rows of W_v, columns of W_o),
- ``ffn``: the FFN hidden neurons (rows of fc1, columns of fc2).

Supported blocks: ``transformers`` BERT-family encoder layers
(``attention.self.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``) and timm ViT/DeiT ``Block``s (fused
``attn.qkv`` with rows [q; k; v], ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``).

A mask entry of ``qk``/``vo`` is, by default, one per-head dimension shared by
all heads (the authors' choice), so a compressed layer is still plain
multi-head attention with a smaller q/k head size and a smaller v head size.
The attention keeps the *original* 1/sqrt(head_dim) scale, so the compressed
model computes exactly what the masked model computes (``attention_scale="kept"``:
1/sqrt(kept q-k dims per head), as the SPP authors' compressed model).

Masks are applied through ``torch.nn.utils.parametrize``. With SPP's default
``mask_sites=authors``: the q and k rows (weights and biases) by the q-k mask, so
q·k scales by its square, the W_o columns by the v-o mask (the same function as
masking v), and the fc1 rows and bias by the FFN mask (before the activation), as
the authors' ``deit/mock.py``. With ``mask_sites=outputs``: the q rows, the W_o
columns and the fc2 columns, which masks q, the attention output and the FFN
activation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pruneflow.errors import UserError
from pruneflow.masking import strip_parametrization_names

TYPES = ("qk", "vo", "ffn")
# Where a search mask multiplies the block: ``authors`` as SPP's code (q and k rows both,
# so q·k scales by the mask squared; fc1 rows, before the activation), ``outputs`` once
# on q and on the FFN activation (fc2 columns). The v-o mask is on W_o's columns in
# both (the same function as on v). With 0/1 masks both compute the same model.
MASK_SITES = ("authors", "outputs")


# ----------------------------------------------------------------------------- compressed attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, dropout: nn.Module) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q/k and v of different head sizes.

    On CPU, ``scaled_dot_product_attention`` falls back to its slower math kernel
    when the head sizes differ; the plain form is faster there. ``mask`` is
    additive (float) or boolean (True = attend), as the callers' masks are.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(dropout(scores.softmax(dim=-1)), v)


class CompressedTimmAttention(nn.Module):
    """timm ``Attention`` with separate q/k and v head sizes and a fixed (original) scale."""

    def __init__(self, attn: nn.Module, qk_dim: int, v_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = int(attn.num_heads)
        self.qk_dim, self.v_dim = int(qk_dim), int(v_dim)
        self.scale = float(scale)
        self.qkv, self.proj = attn.qkv, attn.proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.train(attn.training)  # a new module starts in training mode (dropout on)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q = q.reshape(b, n, h, dq).transpose(1, 2)
        k = k.reshape(b, n, h, dq).transpose(1, 2)
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        if dq == dv or is_causal:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal, scale=self.scale
            )
        else:
            out = attention(q, k, v, attn_mask, self.scale, self.attn_drop)
        out = out.transpose(1, 2).reshape(b, n, h * dv)
        return self.proj_drop(self.proj(out))


class CompressedBertSelfAttention(nn.Module):
    """BERT-family self-attention with separate q/k and v head sizes (encoder use).

    Runs through the model's configured attention implementation (sdpa or
    eager), with the original head size's scaling.
    """

    def __init__(self, sa: nn.Module, qk_dim: int, v_dim: int, scaling: float) -> None:
        super().__init__()
        self.config = sa.config
        self.num_attention_heads = int(sa.num_attention_heads)
        self.qk_head_size, self.v_head_size = int(qk_dim), int(v_dim)
        self.scaling = float(scaling)
        self.query, self.key, self.value = sa.query, sa.key, sa.value
        self.dropout = sa.dropout
        self.is_decoder = getattr(sa, "is_decoder", False)
        self.is_causal = getattr(sa, "is_causal", False)
        self.layer_idx = getattr(sa, "layer_idx", None)
        self.train(sa.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.bert.modeling_bert import eager_attention_forward

        if past_key_values is not None:
            raise NotImplementedError("Compressed (SPP) attention supports encoders only: no key/value cache.")
        shape = hidden_states.shape[:-1]
        q = self.query(hidden_states).view(*shape, -1, self.qk_head_size).transpose(1, 2)
        k = self.key(hidden_states).view(*shape, -1, self.qk_head_size).transpose(1, 2)
        v = self.value(hidden_states).view(*shape, -1, self.v_head_size).transpose(1, 2)
        if self.qk_head_size != self.v_head_size:
            out = attention(q, k, v, attention_mask, self.scaling, self.dropout).transpose(1, 2)
            return out.reshape(*shape, -1).contiguous(), None
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = interface(
            self, q, k, v, attention_mask, dropout=self.dropout.p if self.training else 0.0, scaling=self.scaling, **kwargs
        )
        return out.reshape(*shape, -1).contiguous(), weights


# ----------------------------------------------------------------------------- block discovery
@dataclass
class PairedBlock:
    """One Transformer block and the Linear layers of its three paired dimensions."""

    prefix: str  # module name, e.g. "blocks.0" or "bert.encoder.layer.0"
    family: str  # "timm" | "hf"
    block: nn.Module

    # -- modules ------------------------------------------------------------------
    @property
    def attn(self) -> nn.Module:
        return self.block.attn if self.family == "timm" else self.block.attention.self

    @property
    def num_heads(self) -> int:
        a = self.attn
        return int(a.num_heads if self.family == "timm" else a.num_attention_heads)

    @property
    def qk_dim(self) -> int:
        a = self.attn
        if isinstance(a, CompressedTimmAttention):
            return a.qk_dim
        if isinstance(a, CompressedBertSelfAttention):
            return a.qk_head_size
        return int(a.head_dim if self.family == "timm" else a.attention_head_size)

    @property
    def v_dim(self) -> int:
        a = self.attn
        if isinstance(a, CompressedTimmAttention):
            return a.v_dim
        if isinstance(a, CompressedBertSelfAttention):
            return a.v_head_size
        return self.qk_dim

    @property
    def scale(self) -> float:
        a = self.attn
        return float(a.scale if self.family == "timm" else a.scaling)

    @property
    def ffn_dim(self) -> int:
        return self.fc1.out_features

    @property
    def proj(self) -> nn.Linear:
        return self.block.attn.proj if self.family == "timm" else self.block.attention.output.dense

    @property
    def fc1(self) -> nn.Linear:
        return self.block.mlp.fc1 if self.family == "timm" else self.block.intermediate.dense

    @property
    def fc2(self) -> nn.Linear:
        return self.block.mlp.fc2 if self.family == "timm" else self.block.output.dense

    def linear_names(self, kind: str) -> list[str]:
        """Module names of the Linear layers whose weights a dimension type owns."""
        p = self.prefix
        if self.family == "timm":
            return {"qk": [f"{p}.attn.qkv"], "vo": [f"{p}.attn.qkv", f"{p}.attn.proj"], "ffn": [f"{p}.mlp.fc1", f"{p}.mlp.fc2"]}[kind]
        return {
            "qk": [f"{p}.attention.self.query", f"{p}.attention.self.key"],
            "vo": [f"{p}.attention.self.value", f"{p}.attention.output.dense"],
            "ffn": [f"{p}.intermediate.dense", f"{p}.output.dense"],
        }[kind]

    # -- sizes ----------------------------------------------------------------------
    def dim(self, kind: str) -> int:
        """Per-head size (qk, vo) or number of neurons (ffn)."""
        return {"qk": self.qk_dim, "vo": self.v_dim, "ffn": self.ffn_dim}[kind]

    def entry_cost(self, kind: str) -> int:
        """Weights removed with one per-head dimension (in one head) or one neuron."""
        hidden = self.fc1.in_features
        if kind == "qk":
            return 2 * hidden
        if kind == "vo":
            return hidden + self.proj.out_features
        return hidden + self.fc2.out_features

    def q_linear(self) -> tuple[nn.Linear, int]:
        """The Linear holding the query rows and the row offset of q in it."""
        return (self.attn.qkv, 0) if self.family == "timm" else (self.attn.query, 0)


def _check_timm_block(prefix: str, block: nn.Module) -> None:
    attn, mlp = block.attn, block.mlp
    if isinstance(attn, CompressedTimmAttention):
        return
    problems = []
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) or not isinstance(getattr(attn, "k_norm", nn.Identity()), nn.Identity):
        problems.append("q/k normalisation (qk_norm=True)")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        problems.append("attention output norm (scale_attn_norm=True)")
    if getattr(attn, "gate", None) is not None:
        problems.append("gated attention")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        problems.append("MLP norm (scale_mlp_norm=True)")
    if mlp.fc1.out_features != mlp.fc2.in_features:
        problems.append("a gated MLP (fc1 wider than fc2's input)")
    if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        problems.append("a qkv layer that is not [q; k; v] of num_heads x head_dim")
    if problems:
        raise UserError(f"method=spp cannot compress block '{prefix}' ({type(attn).__name__}): it uses {', '.join(problems)}. "
                        "SPP supports plain ViT/DeiT blocks and BERT-family encoder layers.")


def find_blocks(model: nn.Module) -> list[PairedBlock]:
    """Every timm ViT block or BERT-family encoder layer of ``model``, in order."""
    out = []
    for name, m in model.named_modules():
        attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
        if attn is not None and mlp is not None and hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
            _check_timm_block(name, m)
            out.append(PairedBlock(name, "timm", m))
            continue
        att = getattr(m, "attention", None)
        sa = getattr(att, "self", None) if att is not None else None
        if (
            sa is not None
            and all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value"))
            and isinstance(getattr(getattr(att, "output", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)
        ):
            out.append(PairedBlock(name, "hf", m))
    return out


# ----------------------------------------------------------------------------- index helpers (pure)
def head_rows(keep: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Flat row indices of the kept per-head dims: ``keep`` is [H, k] of indices < head_dim."""
    heads = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1)
    return (offset + heads * head_dim + keep).reshape(-1)


def pad_heads(keep: Sequence[Sequence[int]], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head kept indices of possibly unequal lengths -> ([H, k] indices, [H, k] padding flags).

    Heads keeping fewer than the widest head get extra (unused) dims whose
    weights are zeroed, so that every head has the same size ``k``.
    """
    k = max(1, max(len(h) for h in keep))
    idx = torch.empty(len(keep), k, dtype=torch.long)
    pad = torch.zeros(len(keep), k, dtype=torch.bool)
    for i, h in enumerate(keep):
        h = sorted(int(j) for j in h)
        rest = [j for j in range(head_dim) if j not in set(h)][: k - len(h)]
        idx[i] = torch.tensor(h + rest, dtype=torch.long)
        pad[i, len(h):] = True
    return idx, pad


# A shrunk Linear keeps its first shape here, so that sparsity_report counts the removed
# weights against it (as result.json's measured sparsity does).
ORIGINAL_SHAPE = "pruneflow_original_shape"


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Resize a Linear in place (its identity, hence the prunable-weight references, stays)."""
    if parametrize.is_parametrized(lin):
        raise RuntimeError("remove the masks (parametrizations) before compressing")
    if not hasattr(lin, ORIGINAL_SHAPE):
        setattr(lin, ORIGINAL_SHAPE, tuple(lin.weight.shape))
    grad = lin.weight.requires_grad
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=lin.bias.requires_grad)
    lin.out_features, lin.in_features = weight.shape


@torch.no_grad()
def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    w, b = lin.weight.data, lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows.to(w.device)]
        b = b[rows.to(w.device)] if b is not None else None
    if cols is not None:
        w = w[:, cols.to(w.device)]
    _set_linear(lin, w, b)


# ----------------------------------------------------------------------------- compression
ATTENTION_SCALES = ("original", "kept")


@torch.no_grad()
def compress_block(pb: PairedBlock, qk: Sequence[Sequence[int]], vo: Sequence[Sequence[int]], ffn: Sequence[int],
                   attention_scale: str = "original") -> None:
    """Keep the given per-head q/k dims, per-head v dims and FFN neurons of one block.

    ``qk`` and ``vo`` list kept indices per head (< the current head size); with
    equal lists in every head the result is exact slicing, otherwise heads are
    padded with zeroed dims (see :func:`pad_heads`). ``attention_scale``: ``original``
    keeps 1/sqrt(original head size), so the block computes what the masked one did;
    ``kept`` is 1/sqrt(kept q-k dims per head), SPP's authors' compressed model.
    """
    h, dq, dv, scale = pb.num_heads, pb.qk_dim, pb.v_dim, pb.scale
    if len(qk) != h or len(vo) != h:
        raise ValueError(f"{pb.prefix}: expected kept indices for {h} heads")
    qk_idx, qk_pad = pad_heads(qk, dq)
    vo_idx, vo_pad = pad_heads(vo, dv)
    kq, kv = qk_idx.shape[1], vo_idx.shape[1]
    if attention_scale == "kept":
        scale = kq ** -0.5
    q_rows, k_rows = head_rows(qk_idx, dq, 0), head_rows(qk_idx, dq, h * dq)
    attn = pb.attn
    if pb.family == "timm":
        v_rows = head_rows(vo_idx, dv, 2 * h * dq)
        slice_linear(attn.qkv, rows=torch.cat([q_rows, k_rows, v_rows]))
        q_lin, q_off = attn.qkv, 0
    else:
        slice_linear(attn.query, rows=q_rows)
        slice_linear(attn.key, rows=head_rows(qk_idx, dq, 0))
        slice_linear(attn.value, rows=head_rows(vo_idx, dv, 0))
        q_lin, q_off = attn.query, 0
    slice_linear(pb.proj, cols=head_rows(vo_idx, dv, 0))
    # padded dims contribute nothing: zero q rows (qk) and W_o columns (vo)
    if qk_pad.any():
        rows = q_off + torch.nonzero(qk_pad.reshape(-1)).squeeze(1)
        q_lin.weight[rows] = 0
        if q_lin.bias is not None:
            q_lin.bias[rows] = 0
    if vo_pad.any():
        pb.proj.weight[:, torch.nonzero(vo_pad.reshape(-1)).squeeze(1)] = 0
    ffn_idx = torch.tensor(sorted(int(i) for i in ffn), dtype=torch.long)
    slice_linear(pb.fc1, rows=ffn_idx)
    slice_linear(pb.fc2, cols=ffn_idx)
    if isinstance(attn, (CompressedTimmAttention, CompressedBertSelfAttention)):
        if pb.family == "timm":
            attn.qk_dim, attn.v_dim, attn.scale = kq, kv, float(scale)
        else:
            attn.qk_head_size, attn.v_head_size, attn.scaling = kq, kv, float(scale)
    elif pb.family == "timm":
        pb.block.attn = CompressedTimmAttention(attn, kq, kv, scale)
    else:
        pb.block.attention.self = CompressedBertSelfAttention(attn, kq, kv, scale)


def compress(model: nn.Module, layers: dict[str, dict[str, Any]], attention_scale: str = "original") -> nn.Module:
    """Compress every block named in ``layers`` ({prefix: {"qk", "vo", "ffn"}}), in place
    (``attention_scale``: see :func:`compress_block`)."""
    if attention_scale not in ATTENTION_SCALES:
        raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, not {attention_scale!r}")
    blocks = {pb.prefix: pb for pb in find_blocks(model)}
    missing = sorted(set(layers) - set(blocks))
    if missing:
        raise ValueError(f"blocks not found in the model: {missing}")
    for prefix, kept in layers.items():
        compress_block(blocks[prefix], kept["qk"], kept["vo"], kept["ffn"], attention_scale)
    return model


def apply_structure(model: nn.Module, info: dict[str, Any]) -> nn.Module:
    """Rebuild the compressed shapes recorded by :func:`structure_info` on a fresh model
    (its weights are then loaded from the saved state dict)."""
    return compress(model, info["layers"], info.get("attention_scale", "original"))


def structure_info(layers: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """JSON-able description of a compression: kept indices (of the original dims) per block."""
    clean = {
        p: {"qk": [sorted(int(i) for i in h) for h in k["qk"]], "vo": [sorted(int(i) for i in h) for h in k["vo"]], "ffn": sorted(int(i) for i in k["ffn"])}
        for p, k in layers.items()
    }
    return {"compressed": True, "layers": clean, **extra}


# ----------------------------------------------------------------------------- masks on paired dims
class Scale(nn.Module):
    """Parametrization: multiply rows (``dim=0``; also a bias) or columns (``dim=1``) by
    ``expand(mask)``, the mask repeated to the layer's width."""

    def __init__(self, mask: nn.Parameter, expand: Callable[[torch.Tensor], torch.Tensor], dim: int) -> None:
        super().__init__()
        self.mask = mask
        self.expand = expand
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.expand(self.mask).to(x.dtype)
        if x.ndim == 1 or self.dim == 0:
            return x * s.reshape(-1, *([1] * (x.ndim - 1)))
        return x * s.unsqueeze(0)


@dataclass
class MaskEntry:
    """The mask of one dimension type in one block."""

    block: PairedBlock
    kind: str  # qk | vo | ffn
    param: nn.Parameter  # [dim] (shared by heads, and ffn) or [H, dim]

    @property
    def key(self) -> str:
        return f"{self.block.prefix}.{self.kind}"

    @property
    def shared(self) -> bool:
        return self.kind == "ffn" or self.param.ndim == 1

    def cost(self) -> int:
        """Weights owned by one entry of this mask."""
        c = self.block.entry_cost(self.kind)
        return c * (self.block.num_heads if self.kind != "ffn" and self.param.ndim == 1 else 1)

    def kept_per_head(self, keep: torch.Tensor) -> list[list[int]] | list[int]:
        """Boolean keep vector over the mask's entries -> kept indices (per head for qk/vo)."""
        keep = keep.reshape(self.param.shape).bool().cpu()
        if self.kind == "ffn":
            return torch.nonzero(keep).squeeze(1).tolist()
        if keep.ndim == 1:
            idx = torch.nonzero(keep).squeeze(1).tolist()
            return [list(idx) for _ in range(self.block.num_heads)]
        return [torch.nonzero(row).squeeze(1).tolist() for row in keep]


class PairedMasks:
    """Mask parameters on the paired dimensions of every block, applied through parametrize."""

    def __init__(self, model: nn.Module, kinds: Iterable[str] = TYPES, share_heads: bool = True,
                 allowed: Callable[[PairedBlock, str], bool] | None = None, sites: str = "outputs") -> None:
        self.model = model
        self.sites = sites
        self.entries: list[MaskEntry] = []
        for pb in find_blocks(model):
            for kind in kinds:
                if allowed is not None and not allowed(pb, kind):
                    continue
                shape = (pb.dim(kind),) if share_heads or kind == "ffn" else (pb.num_heads, pb.dim(kind))
                p = nn.Parameter(torch.ones(shape, device=pb.fc1.weight.device, dtype=torch.float32))
                self.entries.append(MaskEntry(pb, kind, p))
        self._registered: list[tuple[nn.Module, str]] = []
        self._order: dict[nn.Module, list[str]] = {}

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def params(self) -> list[nn.Parameter]:
        return [e.param for e in self.entries]

    @staticmethod
    def _expander(entry: MaskEntry, pad_before: int = 0, pad_after: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
        heads = entry.block.num_heads if entry.kind != "ffn" else 1

        def expand(m: torch.Tensor) -> torch.Tensor:
            s = m.repeat(heads) if m.ndim == 1 else m.reshape(-1)
            if pad_before or pad_after:
                s = torch.cat([s.new_ones(pad_before), s, s.new_ones(pad_after)])
            return s

        return expand

    def attach(self) -> None:
        for e in self.entries:
            pb = e.block
            if e.kind == "qk" and self.sites == "authors":  # q and k rows
                self._attach_qk_authors(e)
                continue
            if e.kind == "ffn" and self.sites == "authors":  # fc1 rows: the mask before the activation
                targets = [(pb.fc1, "weight", 0), (pb.fc1, "bias", 0)]
                self._register(targets, Scale, e.param, self._expander(e))
                continue
            if e.kind == "qk":
                lin, _ = pb.q_linear()
                tail = lin.out_features - pb.num_heads * pb.qk_dim  # k and v rows of a fused qkv
                targets = [(lin, "weight", 0), (lin, "bias", 0)]
                expand = self._expander(e, 0, tail)
            else:
                lin = pb.proj if e.kind == "vo" else pb.fc2
                targets = [(lin, "weight", 1)]
                expand = self._expander(e)
            self._register(targets, Scale, e.param, expand)

    def _register(self, targets: Sequence[tuple[nn.Module, str, int]], factory: Callable[..., nn.Module], mask: nn.Parameter,
                  expand: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for module, pname, dim in targets:
            if getattr(module, pname, None) is None:
                continue
            self._order.setdefault(module, list(module._parameters))
            parametrize.register_parametrization(module, pname, factory(mask, expand, dim), unsafe=True)
            self._registered.append((module, pname))

    def _attach_qk_authors(self, e: MaskEntry) -> None:
        pb = e.block
        rep = self._expander(e)
        if pb.family == "timm":  # fused qkv rows [q; k; v]
            lin = pb.block.attn.qkv
            v_rows = lin.out_features - 2 * pb.num_heads * pb.qk_dim

            def expand(m: torch.Tensor) -> torch.Tensor:
                s = rep(m)
                return torch.cat([s, s, s.new_ones(v_rows)])

            self._register([(lin, "weight", 0), (lin, "bias", 0)], Scale, e.param, expand)
        else:
            attn = pb.attn
            self._register([(attn.query, "weight", 0), (attn.query, "bias", 0), (attn.key, "weight", 0), (attn.key, "bias", 0)], Scale, e.param, rep)

    def unmasked_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict as without the masks (the keys a plain model loads): each
        ``<m>.parametrizations.<p>.original`` as ``<m>.<p>``, the masks' own entries left out.
        Detaching and attaching again instead would give the modules new parametrized classes,
        and a compiled model would recompile after every checkpoint."""
        return strip_parametrization_names(self.model.state_dict(), apply_masks=False)

    def detach(self) -> None:
        """Remove the masks and restore the unmasked weights, in their original parameter
        order (``remove_parametrizations`` appends them; the order matters for bit-exact
        resumes: gradient clipping sums over ``model.parameters()`` in order)."""
        for module, pname in reversed(self._registered):
            if parametrize.is_parametrized(module, pname):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
        for module, order in self._order.items():
            for name in order:
                module._parameters[name] = module._parameters.pop(name)
        self._registered.clear()
        self._order.clear()

    @torch.no_grad()
    def set(self, values: Sequence[torch.Tensor]) -> None:
        for e, v in zip(self.entries, values, strict=True):
            e.param.copy_(v.reshape(e.param.shape))

    def kept_layers(self, keep: Sequence[torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Boolean keep vectors (one per mask) -> {prefix: {"qk", "vo", "ffn"}} for :func:`compress`.
        Types without a mask keep every dimension."""
        layers: dict[str, dict[str, Any]] = {}
        for pb in find_blocks(self.model):
            h = pb.num_heads
            layers[pb.prefix] = {
                "qk": [list(range(pb.qk_dim)) for _ in range(h)],
                "vo": [list(range(pb.v_dim)) for _ in range(h)],
                "ffn": list(range(pb.ffn_dim)),
            }
        for e, k in zip(self.entries, keep, strict=True):
            layers[e.block.prefix][e.kind] = e.kept_per_head(k)
        return layers


def uniform_keep(model: nn.Module, fraction: float) -> dict[str, dict[str, Any]]:
    """Keep the first ``fraction`` of every paired dimension in every block (benchmarks, tests)."""
    layers = {}
    for pb in find_blocks(model):
        kq, kv, kf = (max(1, round(fraction * d)) for d in (pb.qk_dim, pb.v_dim, pb.ffn_dim))
        layers[pb.prefix] = {
            "qk": [list(range(kq))] * pb.num_heads,
            "vo": [list(range(kv))] * pb.num_heads,
            "ffn": list(range(kf)),
        }
    return layers
