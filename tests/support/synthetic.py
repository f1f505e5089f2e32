"""Small DiT-shaped modules for tests of single rules (a patch embedding, an attention, a projection)."""

import torch
import torch.nn.functional as F


class TokenPoolingDiT(torch.nn.Module):
    """A DiT-like module whose block adds the mean over all tokens: RAS cannot apply."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 8, 2, stride=2)
        self.block = torch.nn.Linear(8, 8)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x):
        h = self.block(self.embed(x).flatten(2).transpose(1, 2))
        h = h + h.mean(dim=1, keepdim=True)
        out = self.proj(h)
        return out.transpose(1, 2).reshape(x.shape[0], 16, x.shape[2] // 2, x.shape[3] // 2)


class KeywordAttentionDiT(torch.nn.Module):
    """Patch embedding, one attention block calling SDPA with keywords (and a mask over image tokens), a
    final projection: the shape of ``dispatch_attention_fn``'s call in Flux, Wan, Qwen-Image, LTX, ..."""

    def __init__(self, num_tokens: int = 16, with_mask: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Conv2d(4, 24, 2, stride=2)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(24, 24) for _ in range(3))
        self.proj = torch.nn.Linear(24, 12)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        bias = torch.randn(1, 1, num_tokens, num_tokens, generator=g) if with_mask else None
        self.register_buffer("bias", bias)

    def forward(self, x):
        b, _, h, w = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = (f(tokens).view(b, -1, 3, 8).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attended = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=self.bias, dropout_p=0.0)
        tokens = tokens + attended.transpose(1, 2).reshape(b, -1, 24)
        out = self.proj(tokens)
        return out.transpose(1, 2).reshape(b, 12, h // 2, w // 2)
