"""How big each genre is and how hard it is for the dense model (issue 18's data groundwork).

For every genre of ``solm_compile.data.genres``: documents and model tokens per split (``genres.record``), and the
dense model's perplexity on ``n_blocks`` blocks of ``ctx`` tokens of the text ``solm eval --data GENRE`` scores
(a training genre's heldout split; a held-out genre whole), with the standard error over blocks.

    python -m solm_compile.bench.genres --model smollm2 --out results/genres-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def run(model: str, ctx: int, n_blocks: int, threads: int) -> dict:
    import torch

    from solm_compile.bench.granularity import block_nll
    from solm_compile.data import corpora, genres
    from solm_compile.frontend import models

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = models.load(model, weights="fp32")
    hf, tok = loaded.hf.eval(), loaded.tokenizer
    record = genres.record(genres.MIXTURE, lambda text: len(tok.encode(text, add_special_tokens=False)))
    texts = {g: genres.joined(genres.MIXTURE.eval_documents(g)) for g in genres.names()}
    texts["persuasion (reference)"] = corpora.heldout_text()
    ppl = {}
    for name, text in texts.items():
        blocks = corpora.token_blocks(tok, [text], ctx, n_blocks, seed=0)
        nll = block_nll(hf, blocks)
        mean, se = float(nll.mean()), float(nll.std(unbiased=True)) / math.sqrt(len(nll))
        n_tok = len(tok.encode(text, add_special_tokens=False))
        ppl[name] = {"ppl": math.exp(mean), "nll": mean, "nll_se": se, "eval_tokens": n_tok}
    return {"model": loaded.info.name, "ctx": ctx, "blocks": n_blocks, "mixture": record, "dense": ppl,
            "wall_s": time.perf_counter() - t0}


def markdown(r: dict) -> str:
    lines = [f"| genre (role) | source | package@version | train | validation | heldout | "
             f"dense PPL, {r['blocks']} x {r['ctx']} tok of the eval text ± se |", "|---|---|---|---|---|---|---|"]
    for g, info in r["mixture"]["genres"].items():
        d = r["dense"][g]
        lo, hi = math.exp(d["nll"] - d["nll_se"]), math.exp(d["nll"] + d["nll_se"])
        for i, s in enumerate(info["sources"]):
            sp = s["splits"]
            cells = [f"{sp[k]['tokens']:,} ({sp[k]['documents']:,} docs)" for k in ("train", "validation", "heldout")]
            head = f"{g} ({info['role']})" if i == 0 else ""
            ppl = f"{d['ppl']:.2f} ({lo:.2f}–{hi:.2f}); {d['eval_tokens']:,} tok scored from" if i == 0 else ""
            lines.append(f"| {head} | {s['name']} | {s['package']}@{s['version']} | {' | '.join(cells)} | {ppl} |")
    ref = r["dense"]["persuasion (reference)"]
    lines.append(f"| persuasion (reference) | | | | | | {ref['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write OUT (JSON) and OUT with .md")
    a = p.parse_args(argv)
    r = run(a.model, a.ctx, a.blocks, a.threads)
    md = markdown(r)
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2) + "\n")
        Path(a.out).with_suffix(".md").write_text(md)
    print(md)
    print(f"wall {r['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
