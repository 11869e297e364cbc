"""``torch.compile(model, backend="solm")`` with no policy option runs the static floor (issue 18): every decode
step past the gate's warm-up at the budget itself, per row where budgets are per row; its logits are the gated LM's
(reference ops) at those constant controls, and differ from the dense ones."""

import torch

from solm_compile.backend import dynamo
from solm_compile.frontend.gated import GatedLM
from test_dynamo import HALF, NEW, PROMPT_LEN, prompt, tiny_llama


def test_no_policy_option_is_the_static_floor():
    torch._dynamo.reset()
    model = tiny_llama()
    ids = prompt()
    model.compile(backend="solm", options={**HALF, "inductor": False})
    with torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ctl = dynamo.controller(model)
    assert ctl.static and ctl.loaded is None and ctl.calls == {"prefill": 1, "step": NEW - 1}
    want = torch.tensor([HALF["attn_keep"], HALF["mlp_keep"], float(HALF["bits"])])
    controls = [h["controls"] for h in ctl.history]                      # [1, 3] per decode step
    assert all(torch.equal(c[0], want) for c in controls), controls      # the gate's warm-up ends inside the prompt
    lm = GatedLM.from_hf(model)
    toks = res.sequences[:, PROMPT_LEN:]
    k, r, b = (torch.tensor([float(v)]) for v in want)
    one = torch.ones(1)
    gap = []
    with torch.no_grad():
        _, _, cache = lm.prefill(ids)
        _, _, dense = lm.prefill(ids)
        for t in range(NEW - 1):
            lg, _, cache = lm.step(toks[:, t:t + 1], cache, k, r, b)                 # [1, 1, V]
            dlg, _, dense = lm.step(toks[:, t:t + 1], dense, one, one, one * 16)
            torch.testing.assert_close(res.logits[t + 1], lg[:, -1], rtol=1e-4, atol=1e-4)
            gap.append(float((res.logits[t + 1] - dlg[:, -1]).abs().max()))
    assert max(gap) > 1e-2, gap                              # the budget really reached the logits
    torch._dynamo.reset()
