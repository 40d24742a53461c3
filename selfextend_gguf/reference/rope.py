"""Rotary position embedding (RoPE), the way llama.cpp applies it.

Two layouts of the rotated pairs in a head vector x[0..n_dims):
    normal (LLAMA_ROPE_TYPE_NORM, llama architecture): pairs (x[2i], x[2i+1])
    neox   (LLAMA_ROPE_TYPE_NEOX):                     pairs (x[i], x[i + n_dims/2])
Pair i is rotated by the angle  pos * freq_scale * base^(-2i/n_dims) / freq_factor[i].
The rotated pairs are also scaled by attn_factor (rope.scaling.attn_factor, LongRoPE's: ggml_rope_ext
multiplies its cos and sin by it), so a query and a key each carry it once.
Dimensions from n_dims on (partial rotary) pass through unchanged.
Angles are computed in float64 and their cos/sin cast to the dtype of x.
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True, eq=False)
class Rope:
    n_dims: int                                   # rotated dimensions per head
    base: float = 10000.0                         # rope.freq_base (theta)
    freq_scale: float = 1.0                       # 1 / linear scaling factor
    neox: bool = False                            # False: normal (adjacent pairs)
    freq_factors: Optional[torch.Tensor] = None   # [n_dims/2] rope_freqs.weight (or LongRoPE's factors), or None
    attn_factor: float = 1.0                      # scale of the rotated pairs (rope.scaling.attn_factor)

    def angles(self, positions):
        """[n] integer positions -> [n, n_dims/2] float64 rotation angles."""
        exponent = torch.arange(0, self.n_dims, 2, dtype=torch.float64) / self.n_dims
        inv_freq = self.freq_scale * self.base ** (-exponent)
        if self.freq_factors is not None:
            inv_freq = inv_freq / self.freq_factors.to(torch.float64)
        return positions.to(torch.float64)[:, None] * inv_freq[None, :]

    def __call__(self, x, positions):
        """x: [..., n, head_dim], positions: [n] -> x rotated, same shape and dtype."""
        angle = self.angles(positions)
        cos = (angle.cos() * self.attn_factor).to(x.dtype)  # [n, n_dims/2]
        sin = (angle.sin() * self.attn_factor).to(x.dtype)
        rot, rest = x[..., :self.n_dims], x[..., self.n_dims:]
        if self.neox:
            x1, x2 = rot[..., : self.n_dims // 2], rot[..., self.n_dims // 2:]
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y1 = x1 * cos - x2 * sin
        y2 = x1 * sin + x2 * cos
        if self.neox:
            rot = torch.cat((y1, y2), dim=-1)
        else:
            rot = torch.stack((y1, y2), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1)
