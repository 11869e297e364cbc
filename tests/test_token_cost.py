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
    assert dict(part_bytes(META)) == {"attention": 2, "mlp": 20 / 32, "dense": 20 / 32, "head": 34 / 32}
    assert dict(part_bytes({})) == {"attention": 4, "mlp": 4, "dense": 4, "head": 4}     # fp32, concat KV


def test_half_the_mlp_inputs_at_q4_1_weights_and_fp16_kv():
    # elements read at L = 100, κ = 1 (attention dense): KV 1·2·32·100 = 6400; MLP 2·64·128 + 128·64 = 24576
    # (ρ = 0.5 keeps 32 of 64 inputs: 2·32·128 + 8192 = 16384); q/k/v/o 64·4·32 + 2·32·64 = 12288; head 100·64 + 64
    kv, mlp, mlp_half, qkvo, head = 6400 * 2, 24576 * 0.625, 16384 * 0.625, 12288 * 0.625, 6464 * 34 / 32
    want = (kv + mlp_half + qkvo + head) / (kv + mlp + qkvo + head)                     # 37588 / 42708
    got = TokenCost(META)(100, (1.0, 0.5, 16))
    assert abs(got - want) < 1e-12 and abs(got - 37588 / 42708) < 1e-12
    fp32 = TokenCost({k: v for k, v in META.items() if k not in ("weights", "kv_cache")})(100, (1.0, 0.5, 16))
    assert abs(fp32 - (6400 + 16384 + 12288 + 6464) / (6400 + 24576 + 12288 + 6464)) < 1e-12
