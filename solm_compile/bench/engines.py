"""The engines ``solm bench --engines`` runs side by side: one small adapter class per engine, one interface.

Every adapter takes token ids, never text, so every engine sees the same ids:

- ``prefill(ids) -> logits [V]``: a fresh prefill of ``ids`` from an empty cache; the state after it is the *base*;
- ``reset()``: back to the base, cheaply (every timed round decodes from the same cache without prefilling again);
- ``step(token) -> logits [V]``: one decode step: ``token`` appended to the cache, the next token's logits read back;
- ``nll(ids, start) -> [len(ids) - start]``: −log p(ids[t] | ids[:t]) for t ≥ start, from a prefill of
  ``ids[:start]`` and then teacher-forced ``step``s, i.e. through the same decode path the speed rows time (so
  solm's sparse budgets apply, and llama.cpp's f16 KV cache is in the figure).

An engine is described by an ``EngineSpec`` (plain data, so a child process can rebuild it for the memory figure);
adding one is a class here and a line in ``ENGINES``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import numpy as np

from solm_compile.errors import UserError

INSTALL_HINT = "pip install solm-compile[bench]"


@dataclass(frozen=True)
class EngineSpec:
    engine: str                     # a key of ENGINES
    label: str                      # the row's name
    path: str                       # GGUF file, onnxruntime-genai model folder, or solm artifact
    weights: str                    # what the weights are, as the row prints it
    budget: tuple | None = None     # solm: (attn_keep, mlp_keep, bits) fed to the fixed artifact
    per_kv_head: bool = False       # solm: SolmEP chooses pages once per KV head (provider option select_per_kv_head)

    def to_json(self) -> str:
        return json.dumps({"engine": self.engine, "label": self.label, "path": self.path, "weights": self.weights,
                           "budget": list(self.budget) if self.budget else None, "per_kv_head": self.per_kv_head})

    @classmethod
    def from_json(cls, text: str) -> "EngineSpec":
        d = json.loads(text)
        return cls(d["engine"], d["label"], d["path"], d["weights"], tuple(d["budget"]) if d["budget"] else None,
                   bool(d.get("per_kv_head", False)))


def nll_from_logits(logits: np.ndarray, targets) -> np.ndarray:
    """−log softmax(logits)[target] per row, in float64. logits [T, V], targets [T] → [T]."""
    z = np.asarray(logits, dtype=np.float64)                          # [T, V]
    m = z.max(-1)                                                     # [T]
    lse = m + np.log(np.exp(z - m[:, None]).sum(-1))                  # [T]
    return lse - z[np.arange(z.shape[0]), np.asarray(targets)]        # [T]


def perplexity(nll) -> float:
    return float(np.exp(np.mean(np.asarray(nll, dtype=np.float64))))


class Engine:
    """The interface; ``nll`` is written once here from ``prefill`` and ``step``."""

    module = ""                     # the Python module the engine needs (a missing one skips the engine)

    def __init__(self, spec: EngineSpec, threads: int, n_ctx: int):
        self.spec, self.threads, self.n_ctx = spec, threads, n_ctx

    def prefill(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def step(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def nll(self, ids: list[int], start: int) -> np.ndarray:
        z = self.prefill(list(ids[:start]))                           # [V] logits for ids[start]
        rows = []
        for t in range(start, len(ids)):
            rows.append(nll_from_logits(z[None], [ids[t]])[0])
            if t + 1 < len(ids):
                z = self.step(int(ids[t]))
        return np.asarray(rows)

    def close(self) -> None:
        pass


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python on a GGUF file as it is (its KV cache is f16 by default)."""

    module = "llama_cpp"

    def __init__(self, spec, threads, n_ctx):
        super().__init__(spec, threads, n_ctx)
        from llama_cpp import Llama

        self.llm = Llama(model_path=spec.path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False)
        self.vocab = self.llm.n_vocab()
        self.base = 0

    def _logits(self) -> np.ndarray:
        # the last evaluated token's row (only the last token of a batch asks for logits)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))   # [V], a view

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        self.base = self.llm.n_tokens
        return self._logits().copy()

    def reset(self):
        self.llm.n_tokens = self.base       # the next eval drops the cache beyond it (kv_cache_seq_rm)

    def step(self, token):
        self.llm.eval([int(token)])
        return self._logits()

    def close(self):
        self.llm.close()


class GenaiEngine(Engine):
    """onnxruntime-genai on a model its builder wrote; threads set by overlaying ``genai_config.json``."""

    module = "onnxruntime_genai"

    def __init__(self, spec, threads, n_ctx):
        super().__init__(spec, threads, n_ctx)
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(spec.path)
        opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.model = og.Model(cfg)
        self.gen, self.base = None, 0

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(np.asarray(ids, dtype=np.int32))
        self.base = len(ids)
        return self.gen.get_logits()[0, -1].copy()                   # [1, 1, V] → [V]

    def reset(self):
        self.gen.rewind_to(self.base)

    def step(self, token):
        self.gen.append_tokens(np.asarray([token], dtype=np.int32))
        return self.gen.get_logits()[0, -1]                          # [V]

    def close(self):
        self.gen = self.model = None


class ArtifactEngine(Engine):
    """A solm artifact in a ``SolmSession``: the dense kind on stock onnxruntime, the fixed kind on SolmEP with
    ``spec.budget`` fed as its controls. ``session`` lets rows of one artifact share a session (it keeps no state)."""

    module = "onnxruntime"

    def __init__(self, spec, threads, n_ctx, session=None, spin=False):
        super().__init__(spec, threads, n_ctx)
        import onnxruntime as ort

        from solm_compile.runtime.session import SolmSession

        self.ov = ort.OrtValue.ortvalue_from_numpy
        options = {"select_per_kv_head": "1"} if spec.per_kv_head else None
        self.s = session or SolmSession(spec.path, threads=threads, tokenizer=False, spin=spin, ep_options=options)
        if self.s.kind not in ("dense", "fixed"):
            raise UserError(f"{spec.path}: the engines bench runs dense or fixed artifacts, not {self.s.kind}")
        self.budget = tuple(spec.budget or (1.0, 1.0, 16.0))
        self.base: dict = {}
        self.feeds: dict = {}
        self.base_pos = self.pos = 0

    def prefill(self, ids):
        from solm_compile.bench.sessions import prefill_feeds

        feeds = prefill_feeds(self.s, list(ids), self.budget, capacity=self.n_ctx)
        logits = self.s.prefill(feeds, feeds["input_ids"])          # in runs of the session's prefill_chunk
        # the state after the prefill: KV cache (runtime/kv.py's snapshot), SolmEP's page state, the fixed kind's
        # controls
        self.kv = self.s.kv.snapshot(feeds)
        self.base = {k: (v.numpy() if hasattr(v, "numpy") else v).copy() for k, v in feeds.items()
                     if k not in ("input_ids", "position_ids", "past_length") and k not in self.kv}
        self.base_pos = len(ids)
        del feeds                   # the prefill's buffers go before reset() restores fresh ones (peak memory),
        self.s.release()            # the session's kept binding too
        self.reset()
        return logits[0]                                             # [1, V] → [V]

    def reset(self):
        self.feeds = {**{k: self.ov(v.copy()) for k, v in self.base.items()},
                      **self.s.kv.restore(self.kv, capacity=self.n_ctx)}
        self.pos = self.base_pos

    def step(self, token):
        self.feeds["input_ids"] = self.ov(np.asarray([[token]], dtype=np.int64))       # [1, 1]
        self.feeds["position_ids"] = self.ov(np.asarray([[self.pos]], dtype=np.int64))  # [1, 1]
        out = self.s._run(self.feeds)
        self.s._carry(out, self.feeds)
        self.pos += 1
        return out["logits"].numpy()[0, -1]                          # [V]


ENGINES: dict[str, type[Engine]] = {"llama.cpp": LlamaCppEngine, "onnxruntime-genai": GenaiEngine,
                                    "onnxruntime": ArtifactEngine, "solm": ArtifactEngine}
PEERS = ("llama.cpp", "onnxruntime-genai")     # the engines that come from the bench extra


def available(engine: str) -> bool:
    """Whether ``engine``'s Python module imports here."""
    try:
        importlib.import_module(ENGINES[engine].module)
    except ImportError:
        return False
    return True


def skip_line(missing: list[str]) -> str:
    """The one line that says which peers were skipped and how to add them."""
    return f"skipped {', '.join(missing)} (not installed): {INSTALL_HINT}"


def make_engine(spec: EngineSpec, threads: int, n_ctx: int, sessions: dict | None = None,
                spin: bool = False) -> Engine:
    """The adapter for ``spec``; artifact engines share one ``SolmSession`` per (artifact, threads) in ``sessions``
    and spin their onnxruntime threads if ``spin`` (the peers' own defaults stand)."""
    cls = ENGINES.get(spec.engine)
    if cls is None:
        raise UserError(f"unknown engine {spec.engine!r} (choose from {', '.join(ENGINES)})")
    if cls is not ArtifactEngine:
        return cls(spec, threads, n_ctx)
    key = (spec.path, threads, spec.per_kv_head)
    if sessions is not None and key in sessions:
        return ArtifactEngine(spec, threads, n_ctx, session=sessions[key])
    e = ArtifactEngine(spec, threads, n_ctx, spin=spin)
    if sessions is not None:
        sessions[key] = e.s
    return e
