"""``solm run --show``: the answer streamed with each token on the colour of the compute it received.

A token's compute is the step that processed it (the policy picks the controls for the token it reads): the
cost model's bytes at that step's KV length L and controls (κ, ρ, bits) over the dense bytes at the same L
(``analysis.cost.CostModel``, the shapes kept in the artifact's ``solm.cost_shapes``). The colour scale runs from
the cheapest action the artifact could take at the longest L of the run (``lo``) to the dense budget (1).
The rendering itself is ``analysis/shade.py``.
"""

from __future__ import annotations

import sys

from solm_compile.analysis import shade
from solm_compile.analysis.token_cost import TokenCost, scale_floor
from solm_compile.errors import UserError


def run_show(sess, args, budget, chat: bool, out=None) -> int:
    """Generate and stream (or, with ``--json``, print one object with ``per_token``); returns the exit code."""
    import json

    out = out or sys.stdout
    try:
        cost = TokenCost(sess.meta, str(sess.path))
    except UserError:
        if args.show:
            raise
        cost = lambda L, controls: None           # noqa: E731 - plain --json of an older artifact: no costs
    n_prompt = len(sess.prompt_ids(args.prompt, chat))
    lo = scale_floor(cost.floor(n_prompt + args.max_new_tokens, budget)) if isinstance(cost, TokenCost) else None
    on = not args.json and shade.use_colour(out)
    true = shade.truecolor()
    records, held = [], []
    text = shade.IncrementalText(sess.tokenizer.decode)
    if not args.json and not chat:
        out.write(args.prompt)

    def on_step(s: dict) -> None:
        rec = {"token": s["token"], "text": text.push(s["token"]), "action": s["action"],
               "controls": s["controls"], "cost_fraction": cost(s["L"], s["controls"])}
        records.append(rec)
        held.append(rec["cost_fraction"] or 0.0)
        if rec["text"] and not args.json:
            out.write(shade.paint(rec["text"], sum(held) / len(held), lo, 1.0, on, true))
            out.flush()
        if rec["text"]:
            held.clear()

    r = sess.generate(args.prompt, args.max_new_tokens, budget, greedy=args.greedy, temperature=args.temperature,
                      seed=args.seed, chat=chat, on_step=on_step)
    rest = text.flush()
    if records and rest:
        records[-1]["text"] += rest
        if not args.json:
            out.write(shade.paint(rest, sum(held) / len(held), lo, 1.0, on, true))
    vals = [x["cost_fraction"] for x in records if x["cost_fraction"] is not None]
    mean = sum(vals) / len(vals) if vals else None
    if args.json:
        out.write(json.dumps({"text": r.text, "chat": chat, "tokens": r.tokens, "tok_s": r.tok_s, "usage": r.usage,
                              "actions": r.actions, "kind": sess.kind, "providers": sess.sess.get_providers(),
                              "scale": [lo, 1.0], "mean_cost_fraction": mean, "per_token": records}) + "\n")
        return 0
    u = r.usage
    out.write("\n" + shade.legend(lo, 1.0, on, true) + "\n" + shade.summary(records, lo, 1.0) + "\n")
    out.write(f"[{len(r.tokens)} tokens, {r.tok_s:.1f} tok/s, {sess.kind} on {sess.sess.get_providers()[0]}; "
              f"usage attn_keep {u['attn_keep']:.2f} mlp_keep {u['mlp_keep']:.2f} bits {u['bits']:.1f}]\n")
    out.flush()
    return 0
