"""See inside a trained GPT: attention maps, position encodings, the logit lens and per-token loss.

Pure functions on an llmcore ``GPT`` and its tokenizer (in the spirit of bertviz and TransformerLens):

- :func:`trace` runs one forward pass with forward hooks on each block's attention module and on the residual
  stream; the hooks only keep their inputs. The attention probabilities are recomputed from those inputs with the
  module's own weights (q and k from ``c_attn``, RoPE, grouped-query heads repeated as in ``model.py``) and the
  causal softmax: so ``attention: sdpa`` models (whose fused kernel never forms the probabilities) are inspected
  from the same weights, and training never pays for it (no hook exists outside :func:`trace`).
- the logit lens: the residual stream after the embedding and after each block, through the final norm and the
  output head, as next-token probabilities (nostalgebraist's logit lens; TransformerLens's ``accumulated_resid``
  with ``apply_ln``).
- position encodings: the cosine similarity of position vectors (learned, sinusoidal), or the score a fixed
  query/key pair gets as a function of relative distance (RoPE).
- :func:`token_losses`: the loss of every token of a passage, each scored with at least half a context of history.

Figures are matplotlib ``Figure`` objects built without pyplot (safe in worker threads; a notebook shows them
inline). :func:`write_report` writes them as PNGs, ``inspect.json`` (tokens, top predictions, loss summary),
``attention.npz`` (the probabilities, which ``gptlab compare`` draws side by side across sweep points) and one
self-contained ``report.html`` (images embedded as base64: it opens from disk, with no network).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from llmcore.model import GPT, apply_rope

REPORT, SUMMARY, ATTENTION = "report.html", "inspect.json", "attention.npz"
TOP_K = 5  # next tokens the logit lens lists per layer

# ---------------------------------------------------------------------------------------------- the forward pass


@dataclass
class Trace:
    """One prompt through the model. L layers, H heads, T tokens, C width, V vocabulary."""

    ids: list[int]
    tokens: list[str]  # each token as text (for axes and tables)
    attention: torch.Tensor  # (L, H, T, T) probabilities; row i: how query i spreads over keys 0..i
    resid: torch.Tensor  # (L + 1, T, C): the residual stream after the embedding and after each block
    lens: torch.Tensor  # (L + 1, T, V): next-token log-probabilities of each resid through ln_f and lm_head
    logits: torch.Tensor  # (T, V): the model's own output


def attention_probs(attn: torch.nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
    """The causal softmax of one ``CausalSelfAttention`` on its input x (B, T, C): (B, H, T, T), fp32."""
    B, T, _ = x.shape
    H, K, D = attn.n_head, attn.n_kv, attn.head
    q, k, _ = attn.c_attn(x).float().split([H * D, K * D, K * D], dim=2)
    q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(H // K, dim=1)  # grouped-query attention: each kv head serves H / K query heads
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def token_texts(tok: Any, ids: list[int]) -> list[str]:
    """Each token decoded on its own (a byte of a multi-byte character shows as U+FFFD)."""
    return [tok.decode([i]) for i in ids]


def encode_prompt(model: GPT, tok: Any, prompt: str) -> list[int]:
    """The prompt's ids (an empty prompt: EOS, as sampling does), its last block_size tokens."""
    return (tok.encode(prompt) or [tok.eos_id])[-model.cfg.block_size :]


@torch.no_grad()
def trace(model: GPT, tok: Any, prompt: str) -> Trace:
    """Run one prompt with hooks that keep each attention module's input and the residual stream."""
    ids = encode_prompt(model, tok, prompt)
    device = next(model.parameters()).device
    attn_inputs: dict[int, tuple[torch.Tensor, Any]] = {}
    resid: list[torch.Tensor] = []

    def keep_input(i: int):  # the block calls attn(x, rope, cache, layer): positionally today, by name tolerated
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            attn_inputs[i] = (x, args[1] if len(args) > 1 else kwargs.get("rope"))

        return hook

    hooks = [b.attn.register_forward_hook(keep_input(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
    hooks.append(model.drop.register_forward_hook(lambda m, a, out: resid.append(out)))  # embedding (+ positions)
    hooks += [b.register_forward_hook(lambda m, a, out: resid.append(out)) for b in model.blocks]
    training = model.training
    model.eval()
    try:
        logits, _ = model(torch.tensor([ids], device=device), all_logits=True)  # (1, T, V)
        attention = torch.cat([attention_probs(b.attn, *attn_inputs[i]) for i, b in enumerate(model.blocks)])
        stream = torch.cat(resid)  # (L + 1, T, C)
        lens = F.log_softmax(model.lm_head(model.ln_f(stream)).float(), dim=-1)  # (L + 1, T, V)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return Trace(ids, token_texts(tok, ids), attention.cpu(), stream.float().cpu(), lens.cpu(), logits[0].float().cpu())


def top_predictions(tr: Trace, tok: Any, k: int = TOP_K) -> list[list[list[tuple[str, float]]]]:
    """[layer][position] -> the k most likely next tokens with their probabilities (layer 0: the embedding)."""
    p, idx = tr.lens.exp().topk(k, dim=-1)  # (L + 1, T, k)
    return [
        [[(tok.decode([int(i)]), float(q)) for i, q in zip(idx[layer, t], p[layer, t])] for t in range(len(tr.ids))]
        for layer in range(tr.lens.size(0))
    ]


def layer_names(n_layer: int) -> list[str]:
    return ["embed"] + [f"block {i}" for i in range(n_layer)]


# ------------------------------------------------------------------------------------------ position encodings


@torch.no_grad()
def position_similarity(model: GPT) -> torch.Tensor:
    """Cosine similarity of every pair of position vectors (block_size, block_size): learned or sinusoidal."""
    table = model.wpe.weight if model.cfg.pos_encoding == "learned" else model.pos_table
    unit = F.normalize(table.float(), dim=-1)
    return (unit @ unit.T).cpu()


@torch.no_grad()
def rope_scores(model: GPT) -> torch.Tensor:
    """RoPE: the score q . k / sqrt(D) of a fixed query and key (all ones, as in RoFormer's long-term decay
    figure) with the query at the last position and the key at each position: a function of their distance alone.
    (block_size,), index d = distance d."""
    T, D = model.cfg.block_size, model.cfg.head_size
    cos, sin = model.rope_cos.float().cpu(), model.rope_sin.float().cpu()
    rotated = apply_rope(torch.ones(1, 1, T, D), cos, sin)[0, 0]  # (T, D): the all-ones vector at each position
    return (rotated @ rotated[-1] / math.sqrt(D)).flip(0)  # distance 0 first


def by_distance(matrix: torch.Tensor) -> torch.Tensor:
    """The mean of each diagonal of a (T, T) matrix: (T,), index d = |i - j|."""
    return torch.stack([matrix.diagonal(d).mean() for d in range(matrix.size(0))])


# ----------------------------------------------------------------------------------------------- per-token loss


@torch.no_grad()
def token_losses(model: GPT, ids: list[int]) -> torch.Tensor:
    """Cross-entropy (nats) of predicting ids[j + 1] from ids[: j + 1], for j = 0 .. N - 2: (N - 1,). Passages
    longer than block_size are scored in windows that advance by half a block, each token scored once with at
    least half a block of history (the sliding window of Hugging Face's perplexity guide)."""
    T = model.cfg.block_size
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device)
    out = torch.empty(len(ids) - 1)
    done = 0  # targets scored so far
    training = model.training
    model.eval()
    while done < len(ids) - 1:
        end = min(done + max(1, T // 2), len(ids) - 1) if done else min(T, len(ids) - 1)
        lo = max(0, end - T)
        logits, _ = model(x[lo:end][None], all_logits=True)  # (1, end - lo, V)
        loss = F.cross_entropy(logits[0].float(), x[lo + 1 : end + 1], reduction="none")
        out[done:end] = loss[done - lo :].cpu()
        done = end
    model.train(training)
    return out


def loss_summary(losses: torch.Tensor) -> dict[str, float]:
    mean = float(losses.mean())
    return {"tokens": int(losses.numel()), "mean_loss": mean, "bits_per_token": mean / math.log(2),
            "perplexity": math.exp(mean), "median_loss": float(losses.median()),
            "max_loss": float(losses.max())}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- figures


def _label(text: str) -> str:
    """A token as an axis label: newlines, tabs and edge spaces made visible."""
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    stripped = text.strip(" ")
    lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
    return ("·" * lead + stripped + "·" * trail if stripped else "·" * len(text)) or "∅"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def heatmap(ax: Any, probs: Any, tokens: list[str], x_labels: bool, y_labels: bool, title: str) -> Any:
    """One head's attention probabilities (T, T; a tensor or an array) on ax, the tokens on the axes."""
    T = len(tokens)
    image = ax.imshow(np.asarray(probs), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    size = max(4, min(9, 220 // max(T, 1)))
    labels = [_label(t) for t in tokens]
    ax.set_xticks(range(T), labels if x_labels else [], rotation=90, fontsize=size)
    ax.set_yticks(range(T), labels if y_labels else [], fontsize=size)
    ax.set_title(title, fontsize=9)
    return image


def attention_figure(tr: Trace, layer: int | None = None, title: str = "") -> Any:
    """Attention probabilities with the tokens on the axes (rows: queries, columns: keys): every layer x head as a
    grid (a row per layer; tokens named up to 24 of them), or the heads of one layer, larger (four to a row; tokens
    named up to 64)."""
    L, H, T, _ = tr.attention.shape
    if layer is None:
        maps = [(f"layer {li} head {h}", tr.attention[li, h]) for li in range(L) for h in range(H)]
        return _mosaic(maps, H, tr.tokens, 2.3, T <= 24, title or "attention, every layer x head (rows: queries, "
                       "columns: keys)")  # fmt: skip
    maps = [(f"layer {layer} head {h}", tr.attention[layer, h]) for h in range(H)]
    cell = max(3.5, min(7.0, 0.22 * T + 1.5))
    return _mosaic(maps, min(H, 4), tr.tokens, cell, T <= 64, title or f"attention, layer {layer} (rows: queries, "
                   "columns: keys)")  # fmt: skip


def _mosaic(maps: list[tuple[str, torch.Tensor]], columns: int, tokens: list[str], cell: float, labels: bool,
            title: str) -> Any:  # fmt: skip
    """Square maps (T, T) in rows of ``columns``, drawn as one image with white between them and each map's name
    above it: one axes instead of one per map, so a 12 x 12 grid draws in about a second, not twenty."""
    from matplotlib import colormaps

    T, rows = len(tokens), -(-len(maps) // columns)
    gap = max(1, math.ceil(0.22 * T / cell))  # white rows above each map: room for its name
    sx, sy = T + 1, T + gap
    mosaic = np.full((rows * sy, columns * sx - 1), np.nan)
    fig = _figure(cell * columns + 1.6, cell * rows * sy / T + 1.0)
    ax = fig.subplots()
    for n, (name, m) in enumerate(maps):
        y0, x0 = (n // columns) * sy + gap, (n % columns) * sx
        mosaic[y0 : y0 + T, x0 : x0 + T] = m.numpy()
        ax.text(x0 + (T - 1) / 2, y0 - 0.7, name, ha="center", va="bottom", fontsize=8)
    image = ax.imshow(mosaic, cmap=colormaps["viridis"].with_extremes(bad="white"), vmin=0.0, vmax=1.0,
                      interpolation="nearest")  # fmt: skip
    names = [_label(t) for t in tokens] if labels else []
    size = max(4, min(9, int(0.8 * cell * 72 / max(T, 1))))  # points: a token row is cell * 72 / T points high
    ax.set_xticks([c * sx + t for c in range(columns) for t in range(T)] if labels else [], names * columns,
                  rotation=90, fontsize=size)  # fmt: skip
    ax.set_yticks([r * sy + gap + t for r in range(rows) for t in range(T)] if labels else [], names * rows,
                  fontsize=size)  # fmt: skip
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    fig.colorbar(image, ax=ax, shrink=0.6, pad=0.02, label="attention probability")
    fig.suptitle(title)
    return fig


def logit_lens_figure(tr: Trace, tok: Any, title: str = "") -> Any:
    """The logit lens: for each layer (rows) and position (columns), the most likely next token after that layer,
    coloured by its probability."""
    top = top_predictions(tr, tok, 1)
    n, T = len(top), len(tr.ids)
    fig = _figure(max(5.0, 0.9 * T + 2.0), 0.45 * n + 1.8)
    ax = fig.subplots()
    probs = np.array([[top[layer][t][0][1] for t in range(T)] for layer in range(n)])
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for layer in range(n):
        for t in range(T):
            ax.text(t, layer, _label(top[layer][t][0][0])[:10], ha="center", va="center", fontsize=7,
                    color="white" if probs[layer, t] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(T), [_label(t) for t in tr.tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(n), layer_names(n - 1), fontsize=8)
    ax.set_xlabel("input token (each cell: the predicted next token)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability of the top token")
    ax.set_title(title or "logit lens: the top next token after each layer (through ln_f and the output head)")
    return fig


def _positions_matrix(model: GPT) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """(matrix over positions i, j; the curve against distance; its axis label; the matrix's title)."""
    kind = model.cfg.pos_encoding
    if kind == "rope":
        scores = rope_scores(model)  # (T,) by distance
        d = torch.arange(scores.numel())
        dist = d[:, None] - d[None, :]
        matrix = torch.where(dist >= 0, scores[dist.clamp(min=0)], torch.tensor(float("nan")))
        return matrix, scores, "score of q = k = 1 (q . k / sqrt(D))", "RoPE: score of a fixed query/key pair"
    matrix = position_similarity(model)
    return matrix, by_distance(matrix), "mean cosine similarity", f"{kind}: cosine similarity of position vectors"


def positions_figure(model: GPT, title: str = "") -> Any:
    """Left: how positions relate (cosine similarity of position vectors; RoPE: the score of a fixed query/key
    pair at positions i, j). Right: the same against the distance |i - j|, the view in which the three differ."""
    matrix, curve, what, heading = _positions_matrix(model)
    fig = _figure(11.0, 4.6)
    left, right = fig.subplots(1, 2)
    top = float(matrix.nan_to_num().abs().max())
    image = left.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
    left.set(xlabel="position j (key)", ylabel="position i (query)")
    left.set_title(heading, fontsize=9)
    fig.colorbar(image, ax=left, shrink=0.8)
    right.plot(range(curve.numel()), curve.numpy(), lw=1.5)
    right.axhline(0.0, color="grey", lw=0.5)
    right.set(xlabel="relative distance |i - j| (tokens)", ylabel=what)
    right.grid(alpha=0.3)
    right.set_title("against relative distance", fontsize=9)
    fig.suptitle(title or f"position encoding: {model.cfg.pos_encoding}")
    return fig


def token_loss_figure(losses: torch.Tensor, title: str = "") -> Any:
    """The loss of each token of the passage, with its mean."""
    fig = _figure(9.0, 3.2)
    ax = fig.subplots()
    ax.plot(range(1, losses.numel() + 1), losses.numpy(), lw=0.8)
    ax.axhline(float(losses.mean()), color="C3", lw=1, label=f"mean {float(losses.mean()):.3f}")
    ax.set(xlabel="token of the passage", ylabel="loss (nats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or "per-token loss over the passage")
    return fig


def token_loss_html(tokens: list[str], losses: torch.Tensor) -> str:
    """The passage as coloured text: each predicted token's background from white (loss 0) to red (loss >= 8
    nats); hovering shows the loss. The first token has no prediction."""
    spans = [f'<span class="tok">{html.escape(tokens[0])}</span>']
    for text, loss in zip(tokens[1:], losses.tolist()):
        alpha = min(loss / 8.0, 1.0)
        spans.append(f'<span class="tok" style="background: rgba(220, 40, 30, {alpha:.2f})" '
                     f'title="loss {loss:.3f} nats">{html.escape(text)}</span>')  # fmt: skip
    return f'<pre class="passage">{"".join(spans)}</pre>'


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- the report


@dataclass
class Views:
    """Everything a report shows, computed once: one Trace per prompt, the passage's token losses."""

    traces: list[tuple[str, Trace]]
    passage: tuple[list[str], torch.Tensor] | None  # (token texts, losses) or None without a passage


def compute(model: GPT, tok: Any, prompts: list[str], passage: list[int] | None) -> Views:
    """Trace every prompt; score the passage (token ids) when there is one."""
    traces = [(p, trace(model, tok, p)) for p in prompts]
    scored = None
    if passage is not None and len(passage) >= 2:
        scored = (token_texts(tok, passage), token_losses(model, passage))
    return Views(traces, scored)


def passage_ids(tok: Any, tokens: np.ndarray, chars: int) -> list[int]:
    """The shortest prefix of ``tokens`` that decodes to at least ``chars`` characters (all of them if shorter)."""
    ids, n = [], 0
    for i in tokens.tolist():
        if n >= chars:
            break
        ids.append(int(i))
        n += len(tok.decode([int(i)]))
    return ids


def write_report(model: GPT, tok: Any, views: Views, out_dir: Path, title: str) -> dict[str, Any]:
    """PNGs, inspect.json, attention.npz and report.html in out_dir; returns inspect.json's content (``files``:
    every file written, the report first)."""
    from llmcore.io import atomic_open, atomic_write_bytes, atomic_write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    summary: dict[str, Any] = {"title": title, "pos_encoding": model.cfg.pos_encoding, "n_layer": model.cfg.n_layer,
                               "n_head": model.cfg.n_head, "prompts": []}  # fmt: skip
    for i, (prompt, tr) in enumerate(views.traces):
        figures[f"prompt{i}_attention.png"] = attention_figure(tr)
        for layer in range(tr.attention.size(0)):
            figures[f"prompt{i}_layer{layer}.png"] = attention_figure(tr, layer)
        figures[f"prompt{i}_logit_lens.png"] = logit_lens_figure(tr, tok)
        summary["prompts"].append({"prompt": prompt, "ids": tr.ids, "tokens": tr.tokens,
                                   "lens_last": [layer[-1] for layer in top_predictions(tr, tok)]})  # fmt: skip
    figures["positions.png"] = positions_figure(model)
    if views.passage is not None:
        figures["token_loss.png"] = token_loss_figure(views.passage[1])
        summary["passage"] = loss_summary(views.passage[1])
    images = {name: png_bytes(fig) for name, fig in figures.items()}
    for name, data in images.items():
        atomic_write_bytes(out_dir / name, data)
    with atomic_open(out_dir / ATTENTION, "wb") as f:
        np.savez_compressed(f, **{f"prompt{i}": tr.attention.numpy() for i, (_, tr) in enumerate(views.traces)})
    summary["files"] = [REPORT, SUMMARY, ATTENTION, *images]
    atomic_write_json(out_dir / SUMMARY, summary)
    atomic_write_bytes(out_dir / REPORT, report_html(views, summary, images).encode("utf-8"))
    return summary


STYLE = """body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222 }
img { max-width: 100%; height: auto; border: 1px solid #ddd; margin: 0.5em 0 }
table { border-collapse: collapse; margin: 0.5em 0 }
td, th { border: 1px solid #ccc; padding: 2px 8px; font-size: 90% }
code, .tokcell { font-family: monospace; white-space: pre }
.passage { white-space: pre-wrap; line-height: 1.5 } .tok { border-radius: 2px }"""


def _img(name: str, images: dict[str, bytes], alt: str) -> str:
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" data-file="{name}">'


def _prompt_section(i: int, prompt: str, tr: Trace, info: dict[str, Any], images: dict[str, bytes]) -> str:
    tokens = "".join(
        f"<tr><td>{t}</td><td class='tokcell'>{html.escape(_label(s))}</td><td>{j}</td></tr>"
        for t, (s, j) in enumerate(zip(tr.tokens, tr.ids))
    )
    cells = lambda top: "".join(f"<td class='tokcell'>{html.escape(_label(s))} {p:.3f}</td>" for s, p in top)
    names = layer_names(tr.attention.size(0))
    lens = "".join(f"<tr><th>{n}</th>{cells(top)}</tr>" for n, top in zip(names, info["lens_last"]))
    per_layer = "".join(
        "<details><summary>layer {}</summary>{}</details>".format(
            layer, _img(f"prompt{i}_layer{layer}.png", images, f"attention in layer {layer}")
        )
        for layer in range(tr.attention.size(0))
    )
    return (
        f"<section class='prompt'><h2>Prompt {i}: <code>{html.escape(repr(prompt))}</code></h2>"
        f"<h3>Tokens</h3><table class='tokens'><tr><th>position</th><th>token</th><th>id</th></tr>{tokens}</table>"
        f"<h3>Attention, every layer x head</h3>{_img(f'prompt{i}_attention.png', images, 'attention grid')}"
        f"<p>One layer at a time:</p>{per_layer}"
        f"<h3>Logit lens</h3>{_img(f'prompt{i}_logit_lens.png', images, 'logit lens')}"
        f"<p>Top {TOP_K} next tokens after the last token, per layer:</p><table class='lens'>{lens}</table>"
        "</section>"
    )


def _loss_section(views: Views, summary: dict[str, Any], images: dict[str, bytes]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    stats = "".join(f"<tr><th>{k.replace('_', ' ')}</th><td>{fmt(v)}</td></tr>" for k, v in summary["passage"].items())
    return (
        "<section class='loss'><h2>Per-token loss over a validation passage</h2>"
        f"<table class='loss-summary'>{stats}</table>{_img('token_loss.png', images, 'per-token loss')}"
        f"<p>Each token coloured by its loss (white: 0, red: 8 nats or more; hover for the value):</p>"
        f"{token_loss_html(*views.passage)}</section>"
    )


def report_html(views: Views, summary: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained page: no script, no stylesheet or image fetched from anywhere."""
    title = html.escape(summary["title"])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body><h1>{title}</h1><p>{summary['n_layer']} layers, {summary['n_head']} heads, position encoding "
        f"<b>{summary['pos_encoding']}</b>.</p>"
    ]
    for i, ((prompt, tr), info) in enumerate(zip(views.traces, summary["prompts"])):
        parts.append(_prompt_section(i, prompt, tr, info, images))
    parts.append(f"<section><h2>Position encoding</h2>{_img('positions.png', images, 'position encoding')}</section>")
    if views.passage is not None:
        parts.append(_loss_section(views, summary, images))
    parts.append("</body></html>")
    return "".join(parts)
