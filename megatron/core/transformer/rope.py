"""Rotary position embeddings (RoFormer), rotate-half pairing as in Megatron-Core and Hugging Face.

Dimension i of the rotated slice is paired with dimension i + rot_dim/2. With `--rotary-percent
p` only the first `p * head_dim` dimensions of each head are rotated; the rest pass through.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds inverse frequencies; `forward(S)` gives the cos/sin tables for positions 0..S-1."""

    def __init__(self, head_dim: int, rotary_percent: float = 1.0, base: float = 10000.0):
        super().__init__()
        self.rot_dim = int(head_dim * rotary_percent)
        inv_freq = 1.0 / (base ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float64) / self.rot_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: [S] or [B, S] ints. Returns cos, sin of shape [..., S, rot_dim] in fp32."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.to(position_ids.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x_BHSd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim features of x_BHSd [B, H, S, d]; cos/sin are [S, r] or [B, S, r].

    With halves x1, x2 of the rotated slice and c, s the first half of cos/sin (the second half
    repeats it): out = [x1 c - x2 s, x2 c + x1 s], i.e. x cos + rotate_half(x) sin.
    """
    rot_dim = cos.shape[-1]
    half = rot_dim // 2
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    c, s = cos[..., :half].to(x_BHSd.dtype), sin[..., :half].to(x_BHSd.dtype)
    x1, x2, x_pass = x_BHSd[..., :half], x_BHSd[..., half:rot_dim], x_BHSd[..., rot_dim:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x_pass], dim=-1)
