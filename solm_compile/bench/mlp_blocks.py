"""Per-token decode time of one MLP (SmolLM2: 576 -> 1536 -> 576, gated SiLU), one thread: SolmEP's fp32 SparseMLP,
SolmEP's SparseMLPBlocks (Q4_1-style and int8 blocks; activations fp32 and int8), and stock onnxruntime's
MatMulNBits (accuracy_level 4) x 3 with the activation between them. ``python -m solm_compile.bench.mlp_blocks
[--reps N] [--rounds R]``: R interleaved rounds (every path once per round, N calls each), the median per path of
the rounds' µs per call; prints a markdown table.

``--skip`` (issue 17) times instead skip="x" against skip="h" (Q4_1 gate/up; down Q4_1 for x, re-quantised
transposed to 8 or 4 bits for h; and SolmEP's fp32 SparseMLP on the same values, x and h) at ρ ∈ {1, 0.75, 0.5,
0.3}, with the bytes of weights each call reads (codes plus fp32 scale/offset, counted from the kept blocks/units of
this x), and ``--out`` writes the rows as JSON.

``--cold`` (issue 17) times a model's worth of MLPs in one run (``--layers``, default 30: ~45 MB, more than the
caches), skip h under int8 with down's 4-bit source copy, at ρ ∈ {1, 0.8, 0.6, 0.4, 0.2}: what gathering the kept
units' codes (ρ < 1) costs against streaming down (ρ 1) when the weights come from memory, as in a decode step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from solm_compile.quant.blocks import BlockQuant, quantize_int8, requantize_transposed

F, U8 = TensorProto.FLOAT, TensorProto.UINT8
D, I = 576, 1536


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    return codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _q4_1(rng, n, k) -> BlockQuant:
    codes = rng.integers(0, 16, (n, k // 32, 32), dtype=np.uint8)
    d = (rng.random((n, k // 32)) * 0.004 + 0.001).astype(np.float16).astype(np.float32)
    m = (-8 * d - rng.random((n, k // 32)).astype(np.float32) * 1e-3).astype(np.float16).astype(np.float32)
    return BlockQuant(codes, d, m, 4, "Q4_1")


def _model(nodes, inputs, inits, domains):
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info(n, F, None) for n in inputs],
                          [helper.make_tensor_value_info("y", F, None)],
                          initializer=[numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in inits])
    return helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid(d, 1 if d else 17)
                                                               for d in ("",) + domains])


def fp32_model(w, skip="x"):
    node = helper.make_node("SparseMLP", ["x", "wg", "", "wu", "", "wd", "", "rho", "bits"], ["y"],
                            domain="ai.solm", act="silu", skip=skip)
    return _model([node], ["x", "rho", "bits"], [(k, w[k].dequantize()) for k in ("wg", "wu", "wd")],
                  ("ai.solm",))


def blocks_model(w, activations="fp32", skip="x"):
    names, inits = ["x"], []
    for k in ("wg", "wu", "wd"):
        bq = w[k]
        inits += [(f"{k}.q", _pack(bq.codes, bq.bits)), (f"{k}.s", bq.scale), (f"{k}.m", bq.offset)]
        names += [f"{k}.q", f"{k}.s", f"{k}.m", ""]
    node = helper.make_node("SparseMLPBlocks", names + ["rho", "bits"], ["y"], domain="ai.solm", act="silu",
                            bits_gate=w["wg"].bits, bits_up=w["wu"].bits, bits_down=w["wd"].bits, block_size=32,
                            activations=activations, skip=skip)
    return _model([node], ["x", "rho", "bits"], inits, ("ai.solm",))


def matmulnbits_model(w, accuracy_level=4):
    """Stock onnxruntime: MatMulNBits x 3 (zero points: the blocks' integer offsets) and SiLU between."""
    nodes, inits = [], []
    for k, x, y in (("wg", "x", "g"), ("wu", "x", "u"), ("wd", "h", "y")):
        bq = w[k]
        n, kk = bq.shape
        zp = bq.zero_point if bq.zero_point is not None else np.full(bq.scale.shape, 8, np.uint8)
        if bq.bits == 4:
            zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        inits += [(f"{k}.q", _pack(bq.codes, bq.bits)), (f"{k}.s", bq.scale), (f"{k}.z", zp)]
        nodes.append(helper.make_node("MatMulNBits", [x, f"{k}.q", f"{k}.s", f"{k}.z"], [y], domain="com.microsoft",
                                      K=kk, N=n, bits=bq.bits, block_size=32, accuracy_level=accuracy_level))
    nodes += [helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["a"]),
              helper.make_node("Mul", ["a", "u"], ["h"])]
    return _model(nodes, ["x"], inits, ("com.microsoft",))


def _time(sess, feeds, reps):
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feeds)
    return (time.perf_counter() - t) / reps * 1e6


def _silu(v):
    return v / (1 + np.exp(-v))


def bytes_read(w, x, rho: float, skip: str, fp32: bool = False) -> int:
    """Weight bytes one call reads: a matrix's block (32 codes + fp32 scale + offset) only where its input is
    non-zero (skip x: the blocks of x with a kept channel; down: of h) or, skip h, down's kept units' rows. ``fp32``:
    the fp32 SparseMLP, whose gate/up rows are per input channel: 4 bytes a weight, per kept channel and unit (the
    real columns, not its panel padding)."""
    def per_block(bq):
        return 32 * bq.bits // 8 + 8
    if fp32:
        xd = x[0, 0].astype(np.float64)
        k = min(max(int(np.ceil(np.float32(rho) * (D if skip == "x" else I) - 1e-9)), 1), D if skip == "x" else I)
        if skip == "h":
            return 4 * (2 * I * D + k * D)
        keep = np.abs(xd) >= np.sort(np.abs(xd))[::-1][k - 1]
        xs = np.where(keep, xd, 0.0)
        h = _silu(w["wg"].dequantize() @ xs) * (w["wu"].dequantize() @ xs)
        return 4 * (2 * I * int(keep.sum()) + D * int((h != 0).sum()))
    xd = x[0, 0].astype(np.float64)
    k = min(max(int(np.ceil(rho * D - 1e-9)), 1), D)
    keep_x = np.abs(xd) >= np.sort(np.abs(xd))[::-1][k - 1] if skip == "x" else np.ones(D, bool)
    xs = np.where(keep_x, xd, 0.0)
    nz_x = int((xs.reshape(-1, 32) != 0).any(1).sum())
    gate_up = 2 * I * nz_x * per_block(w["wg"])
    if skip == "x":
        h = _silu(w["wg"].dequantize() @ xs) * (w["wu"].dequantize() @ xs)
        return gate_up + D * int((h.reshape(-1, 32) != 0).any(1).sum()) * per_block(w["wd"])
    kept = min(max(int(np.ceil(np.float32(rho) * I - 1e-9)), 1), I)
    return gate_up + kept * (D // 32) * per_block(w["wd"])


def skip_table(args, session, rng) -> list[dict]:
    """skip x vs h at ρ ∈ {1, 0.75, 0.5, 0.3}, interleaved rounds; rows with µs (median, min) and bytes read."""
    q = {k: _q4_1(rng, *s) for k, s in (("wg", (I, D)), ("wu", (I, D)), ("wd", (D, I)))}
    variants = [("x", "Q4_1", q, "int8"), ("x", "Q4_1", q, "fp32")]
    for bits in (8, 4):
        wt = {**q, "wd": requantize_transposed(q["wd"], bits)}
        variants += [("h", f"{bits}-bit transposed", wt, "int8"), ("h", f"{bits}-bit transposed", wt, "fp32")]
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    paths = []
    for rho in (1.0, 0.75, 0.5, 0.3):
        feeds = {"x": x, "rho": np.array([rho], np.float32), "bits": np.array([16.0], np.float32)}
        for skip, down, w, acts in variants:
            paths.append(({"skip": skip, "down": down, "activations": acts, "rho": rho,
                           "bytes": bytes_read(w, x, rho, skip)}, session(blocks_model(w, acts, skip), True), feeds))
        for skip in ("x", "h"):      # SolmEP's fp32 SparseMLP on the same (dequantised) values
            paths.append(({"skip": skip, "down": "fp32 SparseMLP", "activations": "fp32", "rho": rho,
                           "bytes": bytes_read(q, x, rho, skip, fp32=True)}, session(fp32_model(q, skip), True), feeds))
    for _, sess, feeds in paths:
        _time(sess, feeds, max(args.reps // 4, 20))
    times = [[] for _ in paths]
    for _ in range(args.rounds):
        for i, (_, sess, feeds) in enumerate(paths):
            times[i].append(_time(sess, feeds, args.reps))
    dense = paths[0][0]["bytes"]
    rows = [{**row, "us": float(np.median(ts)), "us_min": min(ts), "bytes_vs_x_dense": row["bytes"] / dense}
            for (row, _, _), ts in zip(paths, times)]
    print("| skip | down | activations | ρ | µs / token (median) | min | weight KiB read | vs x at ρ 1 |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['skip']} | {r['down']} | {r['activations']} | {r['rho']} | {r['us']:.1f} | {r['us_min']:.1f} | "
              f"{r['bytes'] / 1024:.0f} | {r['bytes_vs_x_dense']:.3f} |")
    return rows


def chain_model(layers):
    """``len(layers)`` SparseMLPBlocks nodes on the same x (a chain's outputs would drift to 0 or inf on random
    weights, and a zero block of x is never read), each its own weights, int8 activations, skip h with down's 4-bit
    source copy: rows at ρ < 1 gather their kept units (DownG), ρ 1 streams down. Outputs y0, y1, ..."""
    nodes, inits = [], []
    for i, (w, src) in enumerate(layers):
        names = ["x"]
        for k in ("wg", "wu", "wd"):
            bq = w[k]
            inits += [(f"{k}{i}.q", _pack(bq.codes, bq.bits)), (f"{k}{i}.s", bq.scale), (f"{k}{i}.m", bq.offset)]
            names += [f"{k}{i}.q", f"{k}{i}.s", f"{k}{i}.m", ""]
        inits += [(f"dd{i}.q", _pack(src.codes, src.bits)), (f"dd{i}.s", src.scale), (f"dd{i}.m", src.offset)]
        nodes.append(helper.make_node("SparseMLPBlocks", names + ["rho", "bits", f"dd{i}.q", f"dd{i}.s", f"dd{i}.m"],
                                      [f"y{i}"], domain="ai.solm", act="silu", bits_gate=4, bits_up=4, bits_down=8,
                                      bits_down_dense=4, block_size=32, activations="int8", skip="h"))
    g = helper.make_graph(nodes, "mlps", [helper.make_tensor_value_info(n, F, None) for n in ("x", "rho", "bits")],
                          [helper.make_tensor_value_info(f"y{i}", F, None) for i in range(len(layers))],
                          initializer=[numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in inits])
    return helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                               helper.make_opsetid("ai.solm", 1)])


def cold_table(args, session, rng) -> list[dict]:
    """A model's worth of MLPs (30 SmolLM2 layers, ~45 MB of Q4_1: more than the caches) in one run, one token:
    µs per layer at ρ on h ∈ {1, 0.8, 0.6, 0.4, 0.2}, and the down's bytes (ρ 1: the source down streamed; below:
    the kept units' codes gathered, plus every group's half scales). Interleaved rounds, median."""
    layers = []
    for _ in range(args.layers):
        src = _q4_1(rng, D, I)
        layers.append(({"wg": _q4_1(rng, I, D), "wu": _q4_1(rng, I, D), "wd": requantize_transposed(src, 8)}, src))
    sess = session(chain_model(layers), True)
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    rhos = (1.0, 0.8, 0.6, 0.4, 0.2)
    feeds = [{"x": x, "rho": np.array([r], np.float32), "bits": np.array([16.0], np.float32)} for r in rhos]
    for f in feeds:
        _time(sess, f, 5)
    times = [[] for _ in rhos]
    for _ in range(args.rounds):
        for i, f in enumerate(feeds):
            times[i].append(_time(sess, f, max(args.reps // 20, 5)) / args.layers)
    down = D * I // 2 + 2 * 2 * D * (I // 32)           # Q4_1 codes + half d and m, per layer
    rows = []
    for r, ts in zip(rhos, times):
        kept = min(max(int(np.ceil(np.float32(r) * I - 1e-9)), 1), I)
        b = down if r >= 1 else kept * D // 2 + 2 * 2 * D * (I // 32)
        rows.append({"rho": r, "us_layer": float(np.median(ts)), "us_min": min(ts), "down_kib": b / 1024})
    base = rows[0]["us_layer"]
    print(f"| ρ (h) | µs / layer (median) | min | down KiB read | × ρ 1's time |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rho']} | {r['us_layer']:.1f} | {r['us_min']:.1f} | {r['down_kib']:.0f} | "
              f"{base / r['us_layer']:.2f} |")
    return rows


def main(argv=None) -> None:
    import onnxruntime as ort
    from solm_compile.runtime import ep

    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--skip", action="store_true", help="skip x vs skip h (issue 17) instead of the format table")
    p.add_argument("--cold", action="store_true", help="--layers MLPs in one run, too large for the caches, skip h "
                   "under int8 with the source down: what ρ < 1's gathers cost against ρ 1's stream (issue 17)")
    p.add_argument("--layers", type=int, default=30, help="--cold: MLPs in the run (default 30, SmolLM2's)")
    p.add_argument("--out", help="--skip / --cold: write the rows as JSON here")
    args = p.parse_args(argv)
    ep.register(ort)
    rng = np.random.default_rng(0)

    def session(model, solm: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not solm:
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess = ort.InferenceSession(model.SerializeToString(), ep.session_options_with_ep(so, ort=ort))
        assert sess.get_providers()[0] == "SolmEP", sess.get_providers()
        return sess

    if args.cold:
        rows = cold_table(args, session, rng)
        if args.out:
            import json

            from solm_compile.io import atomic_write_text

            atomic_write_text(args.out, json.dumps({"what": f"{args.layers} SmolLM2-shaped MLPs in one run, one token, 1 "
                                                    "thread, SolmEP SparseMLPBlocks skip h, int8, source down",
                                                    "reps": args.reps, "rounds": args.rounds, "rows": rows}, indent=1))
        return
    if args.skip:
        rows = skip_table(args, session, rng)
        if args.out:
            import json

            from solm_compile.io import atomic_write_text

            atomic_write_text(args.out, json.dumps({"what": "one SmolLM2-shaped MLP 576->1536->576, one token, 1 "
                                                    "thread, SolmEP SparseMLPBlocks skip x vs h", "reps": args.reps,
                                                    "rounds": args.rounds, "rows": rows}, indent=1))
        return
    weights = {"q4_1": {k: _q4_1(rng, *s) for k, s in (("wg", (I, D)), ("wu", (I, D)), ("wd", (D, I)))}}
    weights["int8"] = {k: quantize_int8(weights["q4_1"][k].dequantize()) for k in ("wg", "wu", "wd")}
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    paths = []   # (name, rho, session, feeds)
    for rho in (1.0, 0.5):
        feeds = {"x": x, "rho": np.array([rho], np.float32), "bits": np.array([16.0], np.float32)}
        paths.append(("SolmEP SparseMLP fp32", rho, session(fp32_model(weights["q4_1"]), True), feeds))
        for kind in ("q4_1", "int8"):
            for acts in ("fp32", "int8"):
                paths.append((f"SolmEP SparseMLPBlocks {kind}, activations {acts}", rho,
                              session(blocks_model(weights[kind], acts), True), feeds))
        for kind in ("q4_1", "int8"):
            paths.append((f"MatMulNBits acc4 x3 ({'int4' if kind == 'q4_1' else 'int8'}, dense)", rho,
                          session(matmulnbits_model(weights[kind]), False), {"x": x}))
    for _, _, sess, feeds in paths:              # warm up
        _time(sess, feeds, max(args.reps // 4, 20))
    times = [[] for _ in paths]
    for _ in range(args.rounds):
        for i, (_, _, sess, feeds) in enumerate(paths):
            times[i].append(_time(sess, feeds, args.reps))
    print("| path | ρ | µs / token (median) | min |\n|---|---|---|---|")
    for (name, rho, _, _), ts in zip(paths, times):
        print(f"| {name} | {rho} | {float(np.median(ts)):.1f} | {min(ts):.1f} |")


if __name__ == "__main__":
    main()
