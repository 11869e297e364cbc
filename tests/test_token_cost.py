"""analysis/token_cost: a low-bit artifact's per-token compute counts each part at the bytes its storage reads.
The expected fraction is derived by hand below from the cost model's documented element counts."""

from solm_compile.analysis.token_cost import TokenCost, part_bytes

LAYER = {"D": 64, "H": 2, "Hkv": 1, "d": 32, "I": 128, "glu": True}
META = {"kind": "fixed", "gate": {},
        "cost_shapes": {"layers": [LAYER], "vocab": 100, "D": 64},
        "weights": {"packed": {"matmul_Q4_1": 4, "mlp_gate_Q4_1": 1, "mlp_up_Q4_1": 1, "mlp_down_Q4_1": 1,
                               "gather_Q8_0": 1}},
        "kv_cache": {"layout": "buffer", "dtype": "float16"}}


def test_part_bytes_from_the_block_formats():
    assert dict(part_bytes(META)) == {"attention": 2, "mlp": 20 / 32, "mlp_down": 20 / 32, "dense": 20 / 32,
                                      "head": 34 / 32}
    assert dict(part_bytes({})) == {"attention": 4, "mlp": 4, "mlp_down": 4, "dense": 4, "head": 4}  # fp32, concat KV


def test_half_the_mlp_inputs_at_q4_1_weights_and_fp16_kv():
    # elements read at L = 100, κ = 1 (attention dense): KV 1·2·32·100 = 6400; MLP 2·64·128 + 128·64 = 24576
    # (ρ = 0.5 keeps 32 of 64 inputs: 2·32·128 + 8192 = 16384); q/k/v/o 64·4·32 + 2·32·64 = 12288; head 100·64 + 64
    kv, mlp, mlp_half, qkvo, head = 6400 * 2, 24576 * 0.625, 16384 * 0.625, 12288 * 0.625, 6464 * 34 / 32
    want = (kv + mlp_half + qkvo + head) / (kv + mlp + qkvo + head)                     # 37588 / 42708
    got = TokenCost(META)(100, (1.0, 0.5, 16))
    assert abs(got - want) < 1e-12 and abs(got - 37588 / 42708) < 1e-12
    fp32 = TokenCost({k: v for k, v in META.items() if k not in ("weights", "kv_cache")})(100, (1.0, 0.5, 16))
    assert abs(fp32 - (6400 + 16384 + 12288 + 6464) / (6400 + 24576 + 12288 + 6464)) < 1e-12


META_H = {**META, "gate": {"mlp_skip": "h"}, "mlp_skip": "h",
          "weights": {"packed": {"matmul_Q4_1": 4, "mlp_gate_Q4_1": 1, "mlp_up_Q4_1": 1, "mlp_downT_int4-rtn": 1,
                                 "gather_Q8_0": 1}}}


def test_rho_on_h_counts_the_kept_units_of_the_transposed_down():
    # --mlp-skip h (pack_mlp's down_bits 4): down re-stored transposed, 16 code bytes + fp32 scale and offset per 32
    # weights (24/32 bytes a weight). At L = 100, κ = 1, ρ = 0.5: KV 6400·2 = 12800, q/k/v/o 12288·0.625 = 7680,
    # head 6464·34/32 = 6868; gate/up dense 2·64·128 = 16384·0.625 = 10240; down ⌈0.5·128⌉ = 64 units of 64 = 4096
    # ·0.75 = 3072; dense (ρ = 1) reads down's source-layout copy instead, at gate/up's Q4_1: 8192·0.625 = 5120.
    # (ρ on x would give 5120 + 6144 here: a different number.)
    assert dict(part_bytes(META_H))["mlp_down"] == 24 / 32
    assert dict(part_bytes({**META_H, "weights": {"packed": {"mlp_downT_int8-rtn": 1}}}))["mlp_down"] == 40 / 32
    got = TokenCost(META_H)(100, (1.0, 0.5, 16))
    assert abs(got - (12800 + 7680 + 6868 + 10240 + 3072) / (12800 + 7680 + 6868 + 10240 + 5120)) < 1e-12


def test_int8_activations_with_a_4bit_copy_read_the_copy_at_every_budget():
    # SparseMLPBlocks under int8 activations with down's 4-bit source copy runs every row's down on that copy
    # (rows at ρ < 1 read their kept units' Q4_1 codes, 20/32 bytes a weight), so downT's 24/32 is not what a sparse
    # row reads; under fp32 activations it still is. At L = 100, κ = 1, ρ = 0.5 (the hand count above): down 4096
    # weights · 20/32 = 2560 instead of 3072.
    packed = {**META_H["weights"]["packed"], "mlp_down_dense_Q4_1": 1}
    int8 = {**META_H, "weights": {"packed": packed, "activations": "int8"}}
    fp32 = {**META_H, "weights": {"packed": packed, "activations": "fp32"}}
    assert dict(part_bytes(int8))["mlp_down"] == 20 / 32 and dict(part_bytes(fp32))["mlp_down"] == 24 / 32
    got = TokenCost(int8)(100, (1.0, 0.5, 16))
    assert abs(got - (12800 + 7680 + 6868 + 10240 + 2560) / (12800 + 7680 + 6868 + 10240 + 5120)) < 1e-12
