"""bench/granularity's masks against hand-made cases (the measurement itself is a benchmark, not a test)."""

import torch

from solm_compile.bench import granularity as gr


def test_groups_are_kept_whole_in_the_given_order():
    score = torch.arange(64.0)                                   # units 0..63, score = index
    keep = gr._grouped(score, 0.5, torch.arange(64))             # groups {0..31} (sum 496), {32..63} (sum 1520)
    assert keep.tolist() == [False] * 32 + [True] * 32
    perm = torch.cat([torch.arange(0, 64, 2), torch.arange(1, 64, 2)])   # group 0: the even units (992), 1: odd (1024)
    keep = gr._grouped(score, 0.5, perm)
    assert keep.tolist() == [i % 2 == 1 for i in range(64)]


def test_mlp_bytes_by_hand():
    assert abs(gr.mlp_bytes("x_channel", 0.5) - 2 / 3) < 1e-12       # gate, up at half; down whole
    assert abs(gr.mlp_bytes("h_group32", 0.5) - 5 / 6) < 1e-12       # down at half
    assert abs(gr.mlp_bytes("gate_u", 0.25) - 1 / 2) < 1e-12         # gate whole; up and down at a quarter


def test_h_channel_zeroes_all_but_the_largest_units():
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=64, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))
    x = torch.randn(1, 3, 8)
    g = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T)
    h = g * (x @ mlp.up_proj.weight.T)                           # [1,3,64]
    thr = h.abs().sort(-1, descending=True).values[..., 15:16]   # ρ 0.25 of 64: 16 units
    want = torch.where(h.abs() >= thr, h, 0) @ mlp.down_proj.weight.T
    sp = gr.Sparsifier([mlp])
    sp.mode = None
    torch.testing.assert_close(mlp(x), h @ mlp.down_proj.weight.T)
    sp.mode, sp.rho = "h_channel", 0.25
    torch.testing.assert_close(mlp(x), want)
