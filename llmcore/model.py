"""A GPT language model, readable top to bottom (in the spirit of nanoGPT's model.py).

Shapes in comments: B batch, T tokens in this call, Tk tokens attended to (T plus any cached ones),
C = n_embd, H = n_head, K = n_kv_head (key/value heads: K = H is multi-head attention, K < H grouped-query
attention as in Llama), D = C // H (head size), V vocabulary size.

References: GPT-2 (OpenAI), nanoGPT (Karpathy), RoPE (Su et al. 2021), RMSNorm (Zhang & Sennrich 2019),
SwiGLU (Shazeer 2020), PaLM appendix B for the FLOPs estimate.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from llmcore.config import ModelConfig

# ------------------------------------------------------------------------------------ position encodings


def sinusoidal_table(T: int, C: int) -> torch.Tensor:
    """Fixed sin/cos position table of "Attention is all you need": (T, C)."""
    pos = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = torch.exp(torch.arange(0, C, 2, dtype=torch.float32) * (-math.log(10000.0) / C))  # (ceil(C/2),)
    table = torch.zeros(T, C)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: C // 2])
    return table


def rope_tables(T: int, D: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles for positions 0..T-1: cos and sin, each (T, D/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, T, D) by the angles of their positions (cos, sin: (T, D/2))."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ----------------------------------------------------------------------------------------- the blocks


class KVCache:
    """Keys and values of every token seen so far, one (k, v) pair per layer. Used only by `generate`."""

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    def __len__(self) -> int:  # tokens cached (read before a forward pass, when every layer agrees)
        return 0 if self.layers[0] is None else self.layers[0][0].size(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's k, v (B, K, T, D) to the layer's cache; return all of them (B, K, Tk, D)."""
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        self.layers[layer] = (k, v)
        return k, v


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head = cfg.n_head, cfg.kv_heads, cfg.head_size
        self.dropout, self.impl = cfg.dropout, cfg.attention
        qkv = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_size  # q for every head, k and v for each kv head
        self.c_attn = nn.Linear(cfg.n_embd, qkv, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # output projection (residual)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        H, K, D = self.n_head, self.n_kv, self.head
        q, k, v = self.c_attn(x).split([H * D, K * D, K * D], dim=2)  # (B, T, H*D), (B, T, K*D) x 2
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, Tk, D): the cached tokens come first
        if K != H:  # grouped-query attention: each kv head serves H / K query heads
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, Tk, D)
        Tk = k.size(2)
        if self.impl == "plain":
            # query i (absolute position Tk - T + i) may look at keys 0 .. Tk - T + i
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)  # (T, Tk)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, Tk)
            att = att.masked_fill(~mask, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, H, T, D)
        else:
            p = self.dropout if self.training else 0.0
            if T == Tk or T == 1:  # no cache (plain causal), or one new token that may see everything
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=T > 1)
            else:  # several new tokens after a cache: causal mask aligned to the bottom right
                mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's GELU MLP (hidden 4C; exact or tanh-approximated GELU) or SwiGLU (hidden 8C/3 rounded up to a multiple
    of 64: the same parameters; gate and up projections in one matrix); ``mlp_hidden`` overrides the width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        hidden = cfg.hidden
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)  # residual projection
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (B, T, hidden)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------- the GPT


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        # a ModelConfig is valid by construction: n_head divides n_embd, n_kv_head divides n_head, and so on
        self.cfg, self.vocab_size = cfg, vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)  # token embedding, tied to lm_head below
        if cfg.pos_encoding == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.rebuild_buffers()  # fixed tables (sinusoids, RoPE angles) are built, never saved
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017): one (V, C) matrix

        # GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                all_logits: bool = False, select: torch.Tensor | None = None):  # fmt: skip
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T): logits (B, T, V) and the mean cross-entropy (targets of -1 are ignored).
        Without: logits of the last position only, (B, 1, V), and loss None; with ``all_logits``, of every position
        (B, T, V); with ``select`` (a (B, T) boolean mask), of the selected positions only, (N, V) in row-major
        order (scoring continuations: the output head runs on those alone). With a cache, idx holds only the new
        tokens and their positions continue after the cached ones.
        """
        B, T = idx.size()
        t0 = len(cache) if cache is not None else 0  # position of idx[:, 0]
        if t0 + T > self.cfg.block_size:
            raise ValueError(f"sequence of {t0 + T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.cfg.pos_encoding == "learned":
            x = x + self.wpe(torch.arange(t0, t0 + T, device=idx.device))  # (T, C) broadcast over B
        elif self.cfg.pos_encoding == "sinusoidal":  # tokens scaled by sqrt(C) as in Vaswani et al. 3.4,
            x = x * math.sqrt(self.cfg.n_embd) + self.pos_table[t0 : t0 + T]  # else the +-1 table swamps them
        else:
            rope = (self.rope_cos[t0 : t0 + T], self.rope_sin[t0 : t0 + T])  # (T, D/2) each
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)  # (B, T, C)
        x = self.ln_f(x)
        if targets is None:
            if select is not None:
                return self.lm_head(x[select]), None  # (N, V)
            return self.lm_head(x if all_logits else x[:, [-1], :]), None  # (B, T or 1, V)
        logits = self.lm_head(x)  # (B, T, V)
        # mean over the counted targets (-100: not counted, as the loss mask of task data); 0 when none counts
        counted = (targets != -100).sum().clamp(min=1)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100, reduction="sum")
        loss = loss / counted
        return logits, loss

    # ------------------------------------------------------------------------------- bookkeeping

    def rebuild_buffers(self) -> None:
        """(Re)build the fixed position tables: at construction, and after weights were loaded into a model built
        without memory (on torch's meta device)."""
        cfg = self.cfg
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        elif cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.block_size, cfg.head_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def crop_block_size(self, block_size: int) -> None:
        """Shorten the context (a pretrained model's n_positions to a spec's smaller block_size), as nanoGPT does:
        the position table keeps its first block_size rows; fixed tables are rebuilt."""
        assert block_size <= self.cfg.block_size, (block_size, self.cfg.block_size)
        self.cfg = self.cfg.model_copy(update={"block_size": block_size})
        if self.cfg.pos_encoding == "learned":
            self.wpe.weight = nn.Parameter(self.wpe.weight[:block_size].detach().clone())
        elif self.cfg.pos_encoding == "sinusoidal":
            self.pos_table = self.pos_table[:block_size]
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied ones once). non_embedding drops the learned position table; the token
        embedding stays because it is also the output layer (as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.cfg.pos_encoding == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T."""
        L, H, T = self.cfg.n_layer, self.cfg.n_head, self.cfg.block_size
        Q = self.cfg.n_embd // self.cfg.n_head
        return 6 * self.num_params() + 12 * L * H * Q * T

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str):
        """AdamW; weight decay on matrices and embeddings (dim >= 2) only, never on biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type in ("cuda", "cpu")  # one multi-tensor kernel for the update (CPU: torch >= 2.4)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    # -------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens: (B, T + max_new_tokens). Call model.eval() first.

        With the cache, the prompt is run once and then one token per step. Once the sequence is longer than
        block_size, each step recomputes the last block_size tokens without a cache (as nanoGPT does), so the
        result equals generation without the cache. temperature 0 means greedy.
        """
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= self.cfg.block_size:
                if cache is None:
                    cache = KVCache(len(self.blocks))
                    logits, _ = self(idx, cache=cache)  # prefill: the whole prompt
                else:
                    logits, _ = self(idx[:, -1:], cache=cache)  # only the newest token
            else:
                cache = None
                logits, _ = self(idx[:, -self.cfg.block_size :])  # (B, 1, V)
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """Draw one token per row from logits (B, V) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None:  # nucleus: keep the most likely tokens until their mass reaches top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        sorted_probs[(sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p] = 0.0  # the first always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)
