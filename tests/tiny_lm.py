"""Tiny language models for the policy/training tests.

``gated_tiny_llama(seed)``: the real ``GatedLM`` (passes, gated ops, KV cache) over a seeded random 2-layer
Llama. Its weights are random, so the controls barely move its log-likelihood; use it for plumbing (checkpoints,
resume, the KL reward). ``FakeGatedLM``: a stand-in with the same interface whose log-likelihood depends on the
controls in a known way; use it where a test needs the reward to respond to the actions.

For ``FakeGatedLM`` the data follow x_{t+1} = (x_t + 1) mod V (``counting_blocks``); the dense model puts a
logit margin of ``margin`` on that successor; a controlled step scales the margin by κ^½·ρ^½·(b/16)^½, so every
compressed action costs log-likelihood, deterministically. Controls apply only on single-token steps with
L > min_len, like the real LM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from solm_compile.config import GateConfig


@dataclass(frozen=True)
class FakeInfo:
    architecture: str = "FakeForCausalLM"
    hidden_size: int = 16
    num_layers: int = 1
    vocab_size: int = 24
    weights_hash: str = "fake0000"


class FakeCache:
    def __init__(self, layers: list[Tensor]):
        self.layers = layers                              # [B, 1, L, D] each

    @property
    def length(self) -> int:
        return self.layers[0].shape[2]

    def repeat_interleave(self, k: int) -> "FakeCache":
        return FakeCache([x.repeat_interleave(k, dim=0) for x in self.layers])


class FakeGatedLM:
    def __init__(self, vocab: int = 24, hidden: int = 16, margin: float = 4.0, seed: int = 0,
                 gate: GateConfig = GateConfig()):
        g = torch.Generator().manual_seed(seed)
        self.info = FakeInfo(hidden_size=hidden, vocab_size=vocab, weights_hash=f"fake{seed:04d}")
        self.gate, self.margin = gate, margin
        self.emb = torch.randn(vocab, hidden, generator=g)
        self.noise = 0.3 * torch.randn(hidden, vocab, generator=g)

    def embed(self, ids: Tensor) -> Tensor:
        return self.emb[ids]                                                      # [B, T, D]

    def _logits(self, ids: Tensor, hid: Tensor, quality: Tensor) -> Tensor:
        succ = torch.nn.functional.one_hot((ids + 1) % self.info.vocab_size, self.info.vocab_size).float()
        return self.margin * quality[:, None, None] * succ + hid @ self.noise      # [B, T, V]

    def prefill(self, ids: Tensor):
        x = self.embed(ids)                                                       # [B, T, D]
        ctx = x.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]       # [B, T, D]
        hid = torch.tanh(x + ctx)
        return self._logits(ids, hid, torch.ones(ids.shape[0])), hid, FakeCache([x[:, None]])

    def step(self, ids: Tensor, cache: FakeCache, kappa: Tensor, rho: Tensor, bits: Tensor):
        x = self.embed(ids)                                                       # [B, 1, D]
        k = torch.cat([cache.layers[0], x[:, None]], dim=2)                       # [B, 1, L, D]
        hid = torch.tanh(x + k[:, 0].mean(1, keepdim=True))                       # [B, 1, D]
        if ids.shape[1] == 1 and k.shape[2] > self.gate.min_len:
            quality = (kappa * rho * bits / 16).sqrt()
        else:
            quality = torch.ones(ids.shape[0])
        return self._logits(ids, hid, quality), hid, FakeCache([k])


def counting_blocks(n: int, length: int, vocab: int = 24, seed: int = 0) -> Tensor:
    start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(length)[None]) % vocab                           # [n, length]


@functools.lru_cache(maxsize=4)
def gated_tiny_llama(seed: int = 0, vocab: int = 64):
    """GatedLM over a random Llama: hidden 32, 2 layers, 4 query / 2 KV heads (≈2 s to build, cached)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from solm_compile.frontend.gated import GatedLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    return GatedLM.from_hf(model, name=f"tiny-llama-{seed}")


def random_blocks(n: int, length: int, vocab: int = 64, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def random_policy_file(path, ident: dict, gate: GateConfig = GateConfig(), hidden: int = 64, seed: int = 1,
                       train_config: dict | None = None, max_steps: int = 32, grid=None):
    """A policy checkpoint with random weights N(0, 0.3) (so its actions vary) for the model ``ident``; on ``grid``
    (default ``GRID27``, the pre-issue-18 grid with a bits axis, which the artifact tests' --bits 8 needs)."""
    from solm_compile.policy import checkpoint
    from solm_compile.policy.actions import GRID27
    from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy

    grid = GRID27 if grid is None else grid
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy = RecurrentActorCriticPolicy(hidden, grid.num_actions, PolicyConfig(d_model=32, max_steps=max_steps))
        for p in policy.parameters():
            p.data.normal_(0, 0.3)
    checkpoint.save(path, checkpoint.policy_payload(policy.eval(), grid, gate, ident,
                                                    {"policy": policy.cfg.to_dict(), **(train_config or {})}))
    return path


def tiny_solm_artifact(d, hf, tokenizer, seed: int):
    """A ``solm`` artifact of the tiny model ``hf`` with a random policy (``random_policy_file``), written to ``d``."""
    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy import checkpoint

    loaded = models._from_hf(hf, tokenizer, name="tiny", source="<test>")
    lm = GatedLM.from_loaded(loaded)
    path = random_policy_file(d / "policy.pt", checkpoint.model_identity(lm.info), lm.gate, seed=seed)
    return write_artifact(lm, d / "tiny.solm.onnx", "solm", checkpoint.load_policy(path, lm.info),
                          tokenizer=loaded.tokenizer)
