from types import SimpleNamespace

import pytest
from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

from solm_compile.config import GateConfig
from solm_compile.analysis.cost import (LayerShapes, ModelShapes, b, decode_cost, fraction, ideal_speedup, net_keep)

SMOL = ModelShapes.from_hf_config(LlamaConfig(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True))
GATE = GateConfig()  # S=8, sinks 4, window 8, min_len 7

TINY = ModelShapes(layers=(LayerShapes(D=4, H=1, Hkv=1, d=4, I=8, norm_params=8),), vocab=10, D=4,
                   final_norm_params=4, embed_rows=1)
TINY_GATE = GateConfig(page_size=2, sinks=0, window=1, ts=1, tw=1)  # min_len 3


def test_hand_computed_tiny_case():
    # L=8, κ=0.25, ρ=0.5, fp32. Counting elements, then ×4 bytes.
    # q,k,v,o: 4·4 each = 64 weights (128 FLOPs); norms: 8 weights (no FLOPs).
    # MLP dense: gate 4·8 + up 4·8 + down 8·4 = 96 weights, 192 FLOPs.
    # MLP ρ=0.5: k = ⌈0.5·4⌉ = 2 rows of gate and up: 2·8 + 2·8 + 32 = 64 weights, 128 FLOPs.
    # Attention dense: K+V 2·8·4 = 64 elements; FLOPs 2·8·4 (q·K) + 2·8·4 (p·V) = 128.
    # Attention κ=0.25: P = ⌈8/2⌉ = 4 pages, budget ⌈⌈0.25·8⌉/2⌉ = 1 page < 4 → selection runs.
    #   metadata min+max 2·4·4 = 32 elements, scoring 2·2·4·4 = 64 FLOPs;
    #   kept = min(8, 1·2 + 0 sinks + 1 window) = 3 tokens: K+V 2·3·4 = 24 elements, 2·3·4·2 = 48 FLOPs.
    #   → 56 elements, 112 FLOPs.
    # Model: head 10·4 = 40 weights (80 FLOPs), final norm 4, embedding row 4.
    # gated: 64 + 8 + 64 + 56 + 40 + 4 + 4 = 240 elements = 960 bytes; FLOPs 128 + 128 + 112 + 80 = 448.
    # dense: 64 + 8 + 96 + 64 + 40 + 4 + 4 = 280 elements = 1120 bytes; FLOPs 128 + 192 + 128 + 80 = 528.
    c = decode_cost(TINY, TINY_GATE)
    assert c.at(8, 0.25, 0.5, 16) == {"flops": 448, "bytes": 960}
    assert c.at(8) == {"flops": 528, "bytes": 1120}
    assert fraction(TINY, TINY_GATE, 8, 0.25, 0.5) == pytest.approx({"flops": 448 / 528, "bytes": 960 / 1120})
    # "sol" forces no window: kept = 2 tokens → attention 2·4·(2+4) = 48 elements, 4·4·(2+4) = 96 FLOPs.
    sol = decode_cost(TINY, GateConfig(page_size=2, sinks=0, window=1, ts=1, tw=1, attn_select="sol"))
    assert sol.at(8, 0.25, 0.5) == {"flops": 432, "bytes": 928}
    # 2 bytes per element halves every byte count and no FLOP count.
    assert decode_cost(TINY, TINY_GATE, 2).at(8, 0.25, 0.5) == {"flops": 448, "bytes": 480}


@pytest.mark.parametrize("L", [8, 100, 2048, 4096])
def test_dense_controls_are_exactly_dense(L):
    assert fraction(SMOL, GATE, L, 1, 1, 16) == {"flops": 1.0, "bytes": 1.0}
    assert fraction(TINY, TINY_GATE, L, 1.0, 1.0, 16) == {"flops": 1.0, "bytes": 1.0}


def test_controls_off_during_warmup():
    # L ≤ ts+tw+1 = 7: the step is dense whatever the controls say.
    assert fraction(SMOL, GATE, 7, 0.3, 0.3, 4) == {"flops": 1.0, "bytes": 1.0}


def test_bytes_monotone_in_rho_and_kappa():
    rhos = [i / 20 for i in range(2, 21)]
    for k in (1.0, 0.5):
        fr = [fraction(SMOL, GATE, 2048, k, r)["bytes"] for r in rhos]
        assert fr == sorted(fr) and fr[0] < fr[-1]
    # κ while page selection runs (κ < 1, budget < all pages): more keep, more bytes.
    kappas = [i / 20 for i in range(1, 20)]
    fr = [fraction(SMOL, GATE, 2048, k, 0.5)["bytes"] for k in kappas]
    assert fr == sorted(fr) and fr[0] < fr[-1]


def test_selection_overhead_just_below_dense_switch():
    # κ=0.95 keeps ~all tokens (upper bound) and still reads page metadata: dearer than dense.
    assert fraction(SMOL, GATE, 2048, 0.95, 1)["bytes"] > 1.0
    assert fraction(SMOL, GATE, 2048, 1.0, 1)["bytes"] == 1.0


def test_bits_do_not_change_bytes_or_flops():
    c = decode_cost(SMOL, GATE)
    assert b not in c.bytes.free_symbols and b not in c.flops.free_symbols
    assert c.at(2048, 0.5, 0.5, 4) == c.at(2048, 0.5, 0.5, 16)


def test_smollm2_anchor():
    # SmolLM2-135M at κ=ρ=0.5, L=2048, derived by hand (elements; the 4 bytes each cancel in the ratio):
    # per layer: q/k/v/o 576·(9+2·3)·64 + 9·64·576 = 884,736; norms 2·576 = 1,152;
    #   MLP dense 3·576·1536 = 2,654,208, at ρ=0.5 k = 288 rows of gate and up: 2·288·1536 + 1536·576 = 1,769,472;
    #   K/V dense 3 KV heads · 2·2048·64 = 786,432; at κ=0.5: P = 256 pages, budget ⌈1024/8⌉ = 128 pages,
    #   metadata 2·256·64 = 32,768 and kept = 128·8 + 4 sinks + 8 window = 1,036 tokens, 2·1036·64 = 132,608,
    #   per KV head 165,376, ·3 = 496,128.
    # dense layer 4,326,528, gated 3,151,488; ×30 plus LM head 49152·576 + final norm 576 + one embedding row 576
    # = 28,312,704: dense 158,108,544, gated 122,857,344.
    assert ideal_speedup(SMOL, GATE, 2048, 0.5, 0.5) == pytest.approx(158_108_544 / 122_857_344, rel=1e-12)


def test_net_keep():
    assert net_keep(1, 1, 16) == 1
    assert net_keep(0.5, 0.5, 8) == pytest.approx(0.5)
    assert net_keep(0.2, 0.4, 4) == pytest.approx((0.2 + 0.4 + 0.25) / 3)


def _dense_weight_bytes(shapes, L):
    kv = sum(2 * L * s.Hkv * s.d for s in shapes.layers)
    return decode_cost(shapes, GATE).at(L)["bytes"] // 4 - kv


@pytest.mark.parametrize("cfg, params, extra", [
    # published parameter counts; dense reads = all parameters + one embedding row
    (LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                 head_dim=64, num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True),
     134_515_008, 576),
    (Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                 num_hidden_layers=24, vocab_size=151936, tie_word_embeddings=True), 494_032_768, 896),
    (Gemma3TextConfig(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=256, num_hidden_layers=26, vocab_size=262144), 999_885_952, 1152),
    # GPT-2 small: the 1024×768 position table is not read, only one row of it (plus one token row)
    (GPT2Config(), 124_439_808, 2 * 768 - 1024 * 768),
    (SimpleNamespace(model_type="gpt2", n_embd=768, n_inner=None, n_head=12, n_layer=12, vocab_size=50257),
     124_439_808, 2 * 768 - 1024 * 768),
])
def test_from_hf_config_counts_every_weight_once(cfg, params, extra):
    assert _dense_weight_bytes(ModelShapes.from_hf_config(cfg), 100) == params + extra


H_GATE = GateConfig(page_size=2, sinks=0, window=1, ts=1, tw=1, mlp_skip="h")


def test_hand_computed_mlp_skip_x_and_h():
    # TINY at L=8, κ=1 (attention dense), counting elements. Everything but the MLP, as above: q,k,v,o 64 + norms 8
    # + K/V 64 + head 40 + final norm 4 + embedding row 4 = 184 elements; FLOPs 128 + 128 + 80 = 336.
    # MLP (D=4, I=8, gate+up, n=2), dense: gate 4·8 + up 4·8 + down 8·4 = 96 elements, 192 FLOPs.
    # x, ρ=0.5: k = ⌈0.5·4⌉ = 2 input rows of gate and up (2·8 + 2·8 = 32), down dense 32 → 64 elements, 128 FLOPs.
    # h, ρ=0.5: gate/up dense (64), k = ⌈0.5·8⌉ = 4 units' rows of down (4·4 = 16) → 80 elements, 160 FLOPs.
    # h, ρ=0.3: k = ⌈0.3·8⌉ = ⌈2.4⌉ = 3 units → 64 + 12 = 76 elements, 152 FLOPs.
    x, h = decode_cost(TINY, TINY_GATE), decode_cost(TINY, H_GATE)
    assert x.at(8, 1, 0.5) == {"flops": 336 + 128, "bytes": (184 + 64) * 4}
    assert h.at(8, 1, 0.5) == {"flops": 336 + 160, "bytes": (184 + 80) * 4}
    assert h.at(8, 1, 0.3) == {"flops": 336 + 152, "bytes": (184 + 76) * 4}
    assert x.at(8) == h.at(8) == {"flops": 528, "bytes": 1120}              # ρ = 1: both are the dense MLP
    assert h.parts_at(8, 1, 0.5)["mlp"] == {"flops": 160, "bytes": 80 * 4}
    # down stored at its own width ("mlp_down" 1 byte, gate/up 0.625): the rest 184·4 = 736 bytes;
    # x: gate/up 32·0.625 = 20 + down 32·1 = 32 → 788; h: gate/up 64·0.625 = 40 + down 16·1 = 16 → 792;
    # dense: x 64·0.625 + 32 = 72 → 808; h reads down's source-layout copy at ρ = 1, at the "mlp" width:
    # 96·0.625 = 60 → 796. "mlp_down" not named: down at the "mlp" width, h 80·0.625 = 50 → 786.
    widths = (("mlp", 0.625), ("mlp_down", 1))
    assert decode_cost(TINY, TINY_GATE, widths).at(8, 1, 0.5)["bytes"] == 788
    assert decode_cost(TINY, H_GATE, widths).at(8, 1, 0.5)["bytes"] == 792
    assert decode_cost(TINY, TINY_GATE, widths).at(8)["bytes"] == 808
    assert decode_cost(TINY, H_GATE, widths).at(8)["bytes"] == 796
    assert decode_cost(TINY, H_GATE, (("mlp", 0.625),)).at(8, 1, 0.5)["bytes"] == 786
    # warm-up (L ≤ ts+tw+1 = 3): dense whatever ρ says, for h too
    assert fraction(TINY, H_GATE, 3, 0.5, 0.5) == {"flops": 1.0, "bytes": 1.0}


def test_smollm2_anchor_rho_on_h():
    # As test_smollm2_anchor, with ρ on h: gate/up dense 2·576·1536 = 1,769,472, down ⌈0.5·1536⌉ = 768 units' rows
    # of 576 = 442,368: MLP 2,211,840 (x: 1,769,472). Gated layer 884,736 + 1,152 + 2,211,840 + 496,128 = 3,593,856;
    # ×30 + 28,312,704 = 136,128,384 against the same dense 158,108,544.
    h = GateConfig(mlp_skip="h")
    assert ideal_speedup(SMOL, h, 2048, 0.5, 0.5) == pytest.approx(158_108_544 / 136_128_384, rel=1e-12)
    rhos = [i / 20 for i in range(2, 21)]
    fr = [fraction(SMOL, h, 2048, 1.0, r)["bytes"] for r in rhos]
    assert fr == sorted(fr) and fr[0] < fr[-1] == 1.0
