"""``solm verify``: the gated graph at the dense budget must be the original model."""

from __future__ import annotations

import torch

from solm_compile.frontend.gated import GatedModel
from solm_compile.frontend.models import LoadedModel

PROMPT = "The capital of France is"
REL_TOL = 1e-4


def _original_step(loaded: LoadedModel, model: GatedModel):
    """The reference: transformers' own forward when we have the model, else the ungated exported step."""
    if loaded.hf is not None:
        from solm_compile.frontend.export import DecodeStep

        step = DecodeStep(loaded.hf).eval()
        return lambda ids, pos, past: step(ids, pos, tuple(past))
    return lambda ids, pos, past: model.original(ids, pos, *past)


def prompt_ids(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    if loaded.tokenizer is not None:
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids:                                        # an empty prompt has no logits to compare
            return torch.tensor([ids], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, loaded.info.vocab_size, (1, 8), generator=g)


@torch.no_grad()
def verify(loaded: LoadedModel, model: GatedModel, steps: int = 16, prompt: str = PROMPT) -> dict:
    """Prefill + ``steps`` greedy decode steps of both; each side follows its own greedy tokens."""
    original = _original_step(loaded, model)
    ids = prompt_ids(loaded, prompt)
    B, T = ids.shape
    kv = [n for n in loaded.ep.graph.nodes if n.op == "placeholder"]
    _, kvh, _, hd = next(n for n in kv if n.name == loaded.ep.graph_signature.user_inputs[2]).meta["val"].shape
    empty = [torch.zeros(B, int(kvh), 0, int(hd)) for _ in range(2 * loaded.info.num_layers)]
    one = torch.ones(B)
    pos = torch.arange(T).unsqueeze(0)
    ref = original(ids, pos, empty)
    got = model(ids, pos, empty, one, one, one * 16)
    diff, scale, same = 0.0, 0.0, True
    ref_tokens, got_tokens = [], []
    for t in range(steps + 1):
        diff = max(diff, (ref[0][:, -1] - got[0][:, -1]).abs().max().item())
        scale = max(scale, ref[0][:, -1].abs().max().item())
        r_next, g_next = ref[0][:, -1].argmax(-1, keepdim=True), got[0][:, -1].argmax(-1, keepdim=True)
        ref_tokens.append(int(r_next)), got_tokens.append(int(g_next))
        same &= bool((r_next == g_next).all())
        if t == steps:
            break
        p = torch.full((B, 1), T + t)
        ref = original(r_next, p, list(ref[2:]))
        got = model(g_next, p, got[2], one, one, one * 16)
    rel = diff / max(scale, 1e-12)
    return {"model": loaded.info.name, "steps": steps, "max_abs_diff": diff, "max_abs_logit": scale,
            "rel_diff": rel, "tokens_match": same, "tolerance": REL_TOL, "ok": same and rel <= REL_TOL,
            "tokens": got_tokens, "reference_tokens": ref_tokens,
            "text": loaded.tokenizer.decode(got_tokens) if loaded.tokenizer is not None else None}
