"""Symbolic (sympy) FLOPs / bytes-read cost of one decode token (batch 1) of a gated model.

Expressions are in the symbols ``L`` (KV length including the current token), ``kappa``, ``rho`` and ``b``.
Weights, KV cache and page metadata are all ``dtype_bytes`` wide (fp32 = 4 by default); only reads are counted
(the KV append and metadata update are writes).

FLOPs count matrix products at 2 per multiply-add, bias adds at 1 per element and the Quest page scoring.
Elementwise work (norms, activations, residual adds, RoPE, softmax, top-k selection, fake-quant) is
O(D + I + H·L) and left out; norm weights are still counted as bytes read.

Terms, per layer unless noted (``n = 2`` gate+up for a GLU MLP, ``1`` for an up-only MLP):

- dense remainder: q/k/v/o weights ``D·(H+2Hkv)·d + H·d·D`` (+ q/k/v and o biases), norm weights. Unchanged
  by the controls.
- attention (``solm.quest_attention``) at keep κ: pages ``P = ⌈L/S⌉``, page budget ``P_b = ⌈min(⌈κL⌉, L)/S⌉``.
  Selection runs only when controls apply (``L > ts+tw+1``), ``κ < 1`` and ``P_b < P``; otherwise the kernel is
  dense: K and V of all L tokens, ``2·L·d`` elements per KV head, ``4·L·d`` FLOPs per query head.
  With selection: metadata (page min + max) ``2·P·d`` elements per KV head and scoring ``2·2·P·d`` FLOPs per
  query head; then K and V of ``kept = min(L, P_b·S + sinks + window)`` tokens, ``2·kept·d`` elements per KV
  head and ``2·kept·d·2`` FLOPs per query head. ``kept`` is an upper bound: forced sinks/window may overlap
  the kept pages and the last page may be partial (only ties at the page threshold, which keep extra pages,
  can exceed it). K/V reads are counted once per KV head, i.e. the query heads of a GQA group are assumed to
  share pages (or the kernel to read their union from cache); if every head in a group of G picked disjoint
  pages the reads would be up to ``min(L, G·kept)``. Consequence: just below the dense switch (``kept`` ≈ L)
  selection costs more than dense (metadata on top of ~all K/V), so cost is not monotone across that switch.
- MLP (``solm.sparse_mlp``) at keep ρ, by ``GateConfig.mlp_skip`` (what ρ keeps; the kept count is
  ``k(N) = clamp(⌈ρN⌉, 1, N)``, ``N`` when controls do not apply):

  - ``"x"`` (SOL's input channels): ``k = k(D)`` input channels kept. gate/up are stored input-major, so each
    reads ``k·I`` weights and costs ``2·k·I`` FLOPs; the down projection stays dense (``I·D``, ``2·I·D``): zero
    rows of its input are not assumed to be skipped.
  - ``"h"`` (units of the down projection's input): gate/up dense (``n·D·I`` weights, ``2·n·D·I`` FLOPs); down
    reads the ``k = k(I)`` kept units' rows of D (``k·D`` weights, ``2·k·D`` FLOPs): SolmEP stores down one
    contiguous row per unit (SparseMLP's fp32 panels, SparseMLPBlocks' transposed blocks), so a skipped unit costs
    no byte. Ties at the threshold, which keep extra units, can exceed ``k`` (as for x's channels).

  The down projection's elements are their own storage part, ``"mlp_down"`` (:func:`decode_cost`'s
  ``dtype_bytes``; not named: the ``"mlp"`` width), since under h a low-bit artifact re-stores down transposed at
  its own precision; a step that keeps every unit (ρ ≥ 1, or L ≤ min_len) reads down's source-layout copy instead
  (SparseMLPBlocks' ``*_down_dense``), counted at the ``"mlp"`` width. Biases are read in full (counted at the ``"mlp"`` width). Bits b change nothing here:
  weights stay as stored and the fake-quant of the output is elementwise work on D values; b enters only SOL's
  nominal usage (:func:`net_keep`).
- model: LM head ``vocab·D`` (``2·vocab·D`` FLOPs), final-norm weights and ``embed_rows`` embedding rows of D
  (token, plus position for GPT-2). A tied head reads the full matrix all the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from solm_compile.config import GateConfig

L = sp.Symbol("L", integer=True, positive=True)
kappa = sp.Symbol("kappa", positive=True)
rho = sp.Symbol("rho", positive=True)
b = sp.Symbol("b", positive=True)


@dataclass(frozen=True)
class LayerShapes:
    """One decoder layer. ``glu``: gate+up MLP (Llama/Qwen/Gemma) vs up-only (GPT-2). ``attn_gated`` /
    ``mlp_gated``: whether the compiler rewrote that op into its ``solm`` form (else it stays dense)."""

    D: int
    H: int
    Hkv: int
    d: int
    I: int
    glu: bool = True
    mlp_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    norm_params: int = 0
    attn_gated: bool = True
    mlp_gated: bool = True


@dataclass(frozen=True)
class ModelShapes:
    """The gated graph: its layers in order, the LM head (``vocab`` × ``D``), final-norm weights and the number
    of D-wide embedding rows gathered per token. ``tied`` is informational: the head reads the matrix anyway."""

    layers: tuple[LayerShapes, ...]
    vocab: int
    D: int
    tied: bool = False
    final_norm_params: int = 0
    embed_rows: int = 1

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelShapes":
        """Llama / Qwen2 / Qwen3 / Gemma3 / GPT-2 style ``transformers`` configs (or any object with those
        attribute names). Gemma3 sliding-window layers are treated as global (an over-estimate for L > window)."""
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        kind = getattr(cfg, "model_type", "")
        gpt2 = kind == "gpt2" or hasattr(cfg, "n_embd")
        D, H = _attr(cfg, "hidden_size", "n_embd"), _attr(cfg, "num_attention_heads", "n_head")
        d = _attr(cfg, "head_dim") or D // H
        bias = bool(getattr(cfg, "attention_bias", False))
        qk_norm = 2 * d if kind in ("gemma3_text", "gemma3", "qwen3") else 0
        layer = LayerShapes(
            D=D, H=H, Hkv=_attr(cfg, "num_key_value_heads") or H, d=d,
            I=_attr(cfg, "n_inner", "intermediate_size") or 4 * D, glu=not gpt2,
            mlp_bias=gpt2 or bool(getattr(cfg, "mlp_bias", False)),
            qkv_bias=gpt2 or bias or kind == "qwen2", o_bias=gpt2 or bias,
            norm_params=(4 if gpt2 or kind.startswith("gemma3") else 2) * D + qk_norm,
        )
        return cls(layers=(layer,) * _attr(cfg, "num_hidden_layers", "n_layer"), vocab=cfg.vocab_size, D=D,
                   tied=bool(getattr(cfg, "tie_word_embeddings", gpt2)),
                   final_norm_params=2 * D if gpt2 else D, embed_rows=2 if gpt2 else 1)

    def to_dict(self) -> dict:
        """JSON-ready (the artifact keeps it as ``solm.cost_shapes``, so a runtime can cost each token)."""
        return {"layers": [asdict(s) for s in self.layers], "vocab": self.vocab, "D": self.D, "tied": self.tied,
                "final_norm_params": self.final_norm_params, "embed_rows": self.embed_rows}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShapes":
        return cls(**{**d, "layers": tuple(LayerShapes(**s) for s in d["layers"])})


def _attr(cfg, *names):
    for name in names:
        v = getattr(cfg, name, None)
        if v is not None:
            return int(v)
    return None


@dataclass(frozen=True)
class Cost:
    """Per-token ``flops`` and ``bytes`` (sympy), plus ``parts``: name -> (flops, bytes) for the pieces."""

    flops: sp.Expr
    bytes: sp.Expr
    parts: tuple[tuple[str, sp.Expr, sp.Expr], ...] = ()

    def at(self, L: int, kappa=1, rho=1, b=16, exact: bool = False) -> dict:
        """Numeric ``{"flops", "bytes"}`` (Python numbers, or sympy ones with ``exact``). Floats are read as
        decimals (0.7 -> 7/10) so the ceilings match the reference's integer rounding."""
        vals = {"flops": _eval(self.flops, L, kappa, rho, b), "bytes": _eval(self.bytes, L, kappa, rho, b)}
        return vals if exact else {k: _py(v) for k, v in vals.items()}

    def parts_at(self, L: int, kappa=1, rho=1, b=16) -> dict:
        return {n: {"flops": _py(_eval(f, L, kappa, rho, b)), "bytes": _py(_eval(y, L, kappa, rho, b))}
                for n, f, y in self.parts}


def _exact(x):
    return sp.Rational(str(x)) if isinstance(x, float) else sp.sympify(x)


def _eval(expr, L_, k_, r_, b_):
    v = expr.subs({L: _exact(L_), kappa: _exact(k_), rho: _exact(r_), b: _exact(b_)})
    if not v.is_Number:
        raise ValueError(f"cost did not evaluate to a number: {v}")
    return v


def _py(v):
    return int(v) if v.is_integer else float(v)


def _attention(s: LayerShapes, g: GateConfig):
    """(flops, elements read) of the attention kernel itself; see the module docstring."""
    S = g.page_size
    P = sp.ceiling(L / S)
    pb = sp.ceiling(sp.Min(sp.ceiling(kappa * L), L) / S)
    kept = sp.Min(L, pb * S + g.forced_sinks + g.forced_window)
    dense = sp.Or(kappa >= 1, pb >= P, L <= g.min_len)
    tok = sp.Piecewise((L, dense), (kept, True)) if s.attn_gated else L
    meta = sp.Piecewise((0, dense), (P, True)) if s.attn_gated else 0
    return s.H * 4 * s.d * (tok + meta), s.Hkv * 2 * s.d * (tok + meta)


def _mlp(s: LayerShapes, g: GateConfig):
    """(flops, {storage part: elements read}) of the MLP; see the module docstring (ρ on x or on h)."""
    n = 2 if s.glu else 1

    def kept(size: int):
        k = sp.Min(sp.Max(sp.ceiling(rho * size), 1), size)
        return sp.Piecewise((size, L <= g.min_len), (k, True)) if s.mlp_gated else size

    k_in, k_unit = (kept(s.D), s.I) if g.mlp_skip == "x" else (s.D, kept(s.I))
    gate_up, down = n * k_in * s.I, k_unit * s.D
    bias = (n * s.I + s.D) if s.mlp_bias else 0
    flops = 2 * (gate_up + down) + bias
    if g.mlp_skip == "h" and s.mlp_gated:   # every unit kept: the source-layout copy, at the "mlp" width
        full = sp.Ge(rho, 1) | (L <= g.min_len)
        return flops, {"mlp": gate_up + bias + sp.Piecewise((down, full), (0, True)),
                       "mlp_down": sp.Piecewise((0, full), (down, True))}
    return flops, {"mlp": gate_up + bias, "mlp_down": down}


def _dense_layer(s: LayerShapes):
    """(flops, elements read) of q/k/v/o projections (+ biases) and the norm weights."""
    w = s.D * (s.H + 2 * s.Hkv) * s.d + s.H * s.d * s.D
    bias = (s.H + 2 * s.Hkv) * s.d * s.qkv_bias + s.D * s.o_bias
    return 2 * w + bias, w + bias + s.norm_params


def _model(m: ModelShapes):
    """(flops, elements read) of the LM head, final norm and embedding row(s)."""
    return 2 * m.vocab * m.D, m.vocab * m.D + m.final_norm_params + m.embed_rows * m.D


@lru_cache(maxsize=64)
def decode_cost(shapes: ModelShapes, gate_cfg: GateConfig = GateConfig(), dtype_bytes: int | tuple = 4) -> Cost:
    """Symbolic FLOPs and bytes read for one decode token; see the module docstring for every term. ``dtype_bytes``:
    bytes per element read, one number for every part or ``((part, bytes), ...)`` per storage part ("attention": the
    KV cache and page metadata, "mlp": gate/up and the MLP biases, "mlp_down": the down projection (not named: the
    "mlp" width), "dense": q/k/v/o and norms, "head": LM head and embedding row; any other not named: 4). ``parts``
    are "attention", "mlp" (down included), "dense" and "head"."""
    per = dict(dtype_bytes) if isinstance(dtype_bytes, tuple) else {}
    width = {n: per.get(n, 4) if per else dtype_bytes for n in ("attention", "mlp", "dense", "head")}
    width["mlp_down"] = per.get("mlp_down", width["mlp"]) if per else dtype_bytes
    size = {n: sp.Rational(str(v)) for n, v in width.items()}
    acc = {"attention": [0, 0], "mlp": [0, 0], "dense": [0, 0]}           # part -> [flops, bytes]
    for s in shapes.layers:
        for name, (f, elems) in (("attention", _attention(s, gate_cfg)), ("mlp", _mlp(s, gate_cfg)),
                                 ("dense", _dense_layer(s))):
            acc[name][0] += f
            acc[name][1] += sum(e * size[w] for w, e in (elems if isinstance(elems, dict) else {name: elems}).items())
    f, e = _model(shapes)
    acc["head"] = [f, e * size["head"]]
    out = tuple((n, sp.sympify(f), sp.sympify(y)) for n, (f, y) in acc.items())
    return Cost(flops=sp.Add(*(p[1] for p in out)), bytes=sp.Add(*(p[2] for p in out)), parts=out)


def fraction(shapes: ModelShapes, gate_cfg: GateConfig, L: int, kappa, rho, b=16, dtype_bytes: int = 4) -> dict:
    """``{"flops", "bytes"}`` at the controls divided by the dense cost (κ=ρ=1, b=16) at the same L."""
    c = decode_cost(shapes, gate_cfg, dtype_bytes)
    got, dense = c.at(L, kappa, rho, b, exact=True), c.at(L, exact=True)
    return {k: float(got[k] / dense[k]) for k in ("flops", "bytes")}


def net_keep(kappa, rho, b):
    """SOL's nominal "Net Keep Rate" for one step: (κ + ρ + b/16) / 3 (not a FLOP or byte ratio)."""
    return (kappa + rho + b / 16) / 3


def ideal_speedup(shapes: ModelShapes, gate_cfg: GateConfig, L: int, kappa, rho, b=16) -> float:
    """Batch-1 decode is memory-bound, so the ideal speedup is dense bytes / gated bytes."""
    return 1.0 / fraction(shapes, gate_cfg, L, kappa, rho, b)["bytes"]


# ---------------------------------------------------------------------------------------------- fast numeric form
class _FractionPrinter(PythonCodePrinter):
    def _print_Rational(self, e):
        return f"Fraction({e.p}, {e.q})"

    def _print_Half(self, e):
        return "Fraction(1, 2)"


def _dec(x) -> Fraction:
    return Fraction(str(round(float(x), 6)))


class CostModel:
    """:func:`decode_cost` compiled to exact Python arithmetic (Fractions: the same ceilings as ``Cost.at``), for
    many evaluations (every step of an evaluation, every token of ``solm run --show``); memoised."""

    def __init__(self, shapes: ModelShapes, gate, dtype_bytes: int | tuple = 4):
        c = decode_cost(shapes, gate, dtype_bytes)
        self._fn = sp.lambdify((L, kappa, rho, b), [c.flops, c.bytes],
                               modules=[{"Fraction": Fraction, "math": math}, "math"], printer=_FractionPrinter)
        self._memo: dict = {}

    def fraction(self, L: int, kappa, rho, bits=16) -> tuple[float, float]:
        """(flops, bytes) at the controls over the dense ones (κ=ρ=1, b=16) at the same L."""
        key = (int(L), _dec(kappa), _dec(rho), _dec(bits))
        if key not in self._memo:
            got = self._fn(key[0], key[1], key[2], key[3])
            dense = self._fn(key[0], Fraction(1), Fraction(1), Fraction(16))
            self._memo[key] = (float(Fraction(got[0]) / dense[0]), float(Fraction(got[1]) / dense[1]))
        return self._memo[key]

    def mean_fraction(self, Ls, controls) -> tuple[float, float]:
        """Mean (flops, bytes) fraction over steps: ``Ls`` [n] and ``controls`` [n, 3] (tensors or lists)."""
        fr = [self.fraction(int(L), *(c.tolist() if hasattr(c, "tolist") else c)) for L, c in zip(Ls, controls)]
        return sum(f for f, _ in fr) / len(fr), sum(y for _, y in fr) / len(fr)
