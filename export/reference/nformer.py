"""The refinement: the original's ``NFormer`` in eval mode, with the landmarks as an input.

A whole set of N encoder embeddings [B, N, 256] (L2-normalised by the caller) goes in; the
refined embeddings [B, N, 256] (after ``bottleneck``, not yet normalised) come out.  Module and
parameter names match the checkpoint keys under ``nformer.``.

Two evaluation paths compute the same function (DESIGN.md section 1):

* the default O(N k) path: the reciprocal neighbour lists ``(idx, valid)`` from
  :func:`export.reference.reciprocal_neighbors.reciprocal_neighbors`, gathers of ``k_hat[idx]`` and
  ``v[idx]`` and a softmax over the k slots with invalid slots at -inf.  This is what is exported.
* ``dense=True``: the original's eval path transcribed -- N x N similarity, top-k mask,
  ``mask * mask^T``, dense landmark logits and a sparse softmax.  It is the baseline of the
  benchmarks and the form the O(N k) path is tested against.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from export.contract.ops import OP_DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION
from export.reference.reciprocal_neighbors import dense_reciprocal_mask, reciprocal_neighbors


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The original's tanh-approximated GELU (written out as it trained)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class LayerNorm(nn.Module):
    """OpenAI-style LayerNorm: epsilon inside the square root; parameters ``g`` and ``b``."""

    def __init__(self, n_state: int, e: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(n_state))
        self.b = nn.Parameter(torch.zeros(n_state))
        self.e = e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.g * ((x - u) / torch.sqrt(s + self.e)) + self.b


class Conv1D(nn.Module):
    """``b + x @ w`` with ``w`` stored [in, out] (the transpose of nn.Linear), as in the checkpoint."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(nx, nf))
        self.b = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.w) + self.b


class MLP(nn.Module):
    def __init__(self, n_state: int, n_embd: int):
        super().__init__()
        self.c_fc = Conv1D(n_state, n_embd)
        self.c_proj = Conv1D(n_embd, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu(self.c_fc(x)))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, i, t]]`` for x [B, N, C] and idx [B, R, k] -> [B, R, k, C] (one flat Gather)."""
    b, n, c = x.shape
    offset = (torch.arange(b, device=idx.device, dtype=idx.dtype) * n).reshape(b, 1, 1)
    flat = torch.index_select(x.reshape(b * n, c), 0, (idx + offset).reshape(-1))
    return flat.reshape(b, idx.shape[1], idx.shape[2], c)


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.c_attn = Conv1D(n_embd * 3, n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)

    def landmark_projections(self, x: torch.Tensor, landmarks: torch.Tensor):
        """q_hat = q . k[L] and k_hat = k . q[L] per head: both [B, N, H, l]; also v [B, N, C]."""
        b, n, c = x.shape
        h, dh = self.n_head, c // self.n_head
        q, k, v = self.c_attn(x).split(c, dim=2)
        # batched MatMuls rather than Einsum: every backend (TensorRT included) runs them
        q_h = q.reshape(b, n, h, dh).transpose(1, 2)                       # [B, H, N, dh]
        k_h = k.reshape(b, n, h, dh).transpose(1, 2)
        q_l = torch.index_select(q_h, 2, landmarks)                        # [B, H, l, dh]
        k_l = torch.index_select(k_h, 2, landmarks)
        q_hat = torch.matmul(q_h, k_l.transpose(2, 3)).transpose(1, 2)     # [B, N, H, l]
        k_hat = torch.matmul(k_h, q_l.transpose(2, 3)).transpose(1, 2)
        return q_hat, k_hat, v

    def sparse(self, q_hat, k_hat, v, idx, valid) -> torch.Tensor:
        """The O(N k) reciprocal-neighbour attention for the rows of ``q_hat``/``idx`` [B, R, ...]."""
        b, r, h, l = q_hat.shape
        c = v.shape[-1]
        dh = c // h
        k_nb = gather_rows(k_hat.reshape(b, -1, h * l), idx).reshape(b, r, -1, h, l)
        v_nb = gather_rows(v, idx).reshape(b, r, -1, h, dh)
        # [B, R, H, 1, l] @ [B, R, H, l, k] -> logits over the k neighbour slots
        logits = torch.matmul(q_hat.unsqueeze(3), k_nb.permute(0, 1, 3, 4, 2)) / math.sqrt(dh)
        logits = torch.where(valid[:, :, None, None, :], logits, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        # [B, R, H, 1, k] @ [B, R, H, k, dh]
        return torch.matmul(p, v_nb.transpose(2, 3)).reshape(b, r, c)

    def dense(self, q_hat, k_hat, v, mask) -> torch.Tensor:
        """The original's eval path: dense N x N logits, masked, sparse softmax, bmm."""
        b, n, h, l = q_hat.shape
        c = v.shape[-1]
        dh = c // h
        w = torch.matmul(q_hat.permute(0, 2, 1, 3), k_hat.permute(0, 2, 3, 1)) / math.sqrt(dh)
        m = mask[:, None].to(w.dtype).expand(b, h, n, n)
        w = (w * m).reshape(b * h, n, n).to_sparse()
        w = torch.sparse.softmax(w, 2)
        vh = v.reshape(b, n, h, dh).permute(0, 2, 1, 3).reshape(b * h, n, dh)
        a = torch.bmm(w, vh).reshape(b, h, n, dh)
        return a.permute(0, 2, 1, 3).reshape(b, n, c)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.attn = Attention(n_embd, n_head)
        self.ln_1 = LayerNorm(n_embd)
        self.mlp = MLP(4 * n_embd, n_embd)
        self.ln_2 = LayerNorm(n_embd)

    def rowwise(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        n = self.ln_1(x + self.attn.c_proj(a))
        return self.ln_2(n + self.mlp(n))

    def forward(self, x, landmarks, idx, valid, row_block: int | None = None) -> torch.Tensor:
        q_hat, k_hat, v = self.attn.landmark_projections(x, landmarks)
        n = x.shape[1]
        if row_block is None or n <= row_block:
            return self.rowwise(x, self.attn.sparse(q_hat, k_hat, v, idx, valid))
        out = torch.empty_like(x)
        for s in range(0, n, row_block):
            e = min(n, s + row_block)
            a = self.attn.sparse(q_hat[:, s:e], k_hat, v, idx[:, s:e], valid[:, s:e])
            out[:, s:e] = self.rowwise(x[:, s:e], a)
        return out

    def forward_dense(self, x, landmarks, mask) -> torch.Tensor:
        q_hat, k_hat, v = self.attn.landmark_projections(x, landmarks)
        return self.rowwise(x, self.attn.dense(q_hat, k_hat, v, mask))


def neighbors_for_export(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reciprocal-neighbour step as one custom ONNX node (DESIGN.md section 2).

    While exporting, emits ``nformer::ReciprocalNeighbors`` with the TensorRT plugin attributes;
    ``export.onnx_functions`` attaches its standard-op body.  Outputs are int32 (TensorRT plugin
    I/O), converted back to the reference's int64 / bool for the rest of the graph.
    """
    b, n, _ = features.shape
    k_eff = torch.sym_min(k, n)
    idx32, valid32 = torch.onnx.ops.symbolic_multi_out(
        f"{OP_DOMAIN}::{OP_TYPE}",
        (features,),
        {"k": k, "plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE},
        dtypes=(torch.int32, torch.int32),
        shapes=((b, n, k_eff), (b, n, k_eff)),
        version=1,
    )
    return idx32.to(torch.int64), valid32 != 0


class NFormer(nn.Module):
    def __init__(self, n_layer: int = 4, n_embd: int = 256, n_head: int = 2, k: int = 20,
                 num_classes: int = 751):
        super().__init__()
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.bottleneck = nn.BatchNorm1d(n_embd)
        self.k = k
        self.num_classes = num_classes  # of the training-only classifier, kept for the manifest

    def neighbors(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.onnx.is_in_onnx_export():
            return neighbors_for_export(features, self.k)
        return reciprocal_neighbors(features, self.k)

    def forward(self, features: torch.Tensor, landmarks: torch.Tensor, neighbors=None,
                dense: bool = False, row_block: int | None = None) -> torch.Tensor:
        """Refine [B, N, C] features with landmark rows ``landmarks`` [n_layer, l] (int64).

        ``neighbors`` takes precomputed ``(idx, valid)`` (e.g. from the CUDA kernels);
        ``row_block`` bounds the memory of the O(N k) path in eager mode.
        """
        x = features
        if dense:
            if neighbors is None:
                mask = original_topk_mask(x, self.k)
            else:
                mask = dense_reciprocal_mask(neighbors[0], neighbors[1], x.shape[1])
            for i, block in enumerate(self.h):
                x = block.forward_dense(x, landmarks[i], mask)
        else:
            idx, valid = self.neighbors(x) if neighbors is None else neighbors
            for i, block in enumerate(self.h):
                x = block(x, landmarks[i], idx, valid, row_block)
        b, n, c = x.shape
        return self.bottleneck(x.reshape(b * n, c)).reshape(b, n, c)


def original_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The original's N x N mask: fp32 cosine top-k, scattered, times its transpose."""
    xn = x / torch.norm(x, p=2, dim=2, keepdim=True)
    rns = torch.topk(torch.bmm(xn, xn.transpose(1, 2)), min(k, x.shape[1]), dim=2).indices
    mask = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    mask.scatter_(2, rns, 1.0)
    return (mask * mask.transpose(1, 2)) > 0


class NFormerLayers(nn.Module):
    """The refinement with the neighbour lists as inputs (``nformer_layers.onnx``).

    For runtimes that maintain the lists themselves (a gallery that grows by a few items at a time
    updates only the rows that change): ``neighbor_index`` / ``neighbor_valid`` are the int32
    outputs of ``ReciprocalNeighbors`` for the same features.
    """

    def __init__(self, nformer: NFormer):
        super().__init__()
        self.nformer = nformer

    def forward(self, features, landmarks, neighbor_index, neighbor_valid):
        neighbors = (neighbor_index.to(torch.int64), neighbor_valid != 0)
        return self.nformer(features, landmarks, neighbors=neighbors)
