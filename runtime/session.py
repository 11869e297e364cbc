"""Open a ``.solm.onnx`` artifact in onnxruntime and decode with it: KV cache, policy state, IO binding.

    from solm_compile.runtime import SolmSession
    s = SolmSession("smollm2.solm.onnx")
    r = s.generate("The capital of France is", max_new_tokens=32, budget=(0.5, 0.75, 8))
    r.text, r.tok_s, r.usage

One ``run`` per decode step. The prompt is prefilled densely, in runs of at most ``prefill_chunk`` tokens (default
``PREFILL_CHUNK``: the prefill's temporaries, the logits of every fed position above all, scale with a run's tokens,
not the prompt's; docs/protocol.md, "Chunked prefill"); the policy then acts on every
single-token step, in episodes of ``episode_len`` steps (the artifact restarts each row's episode itself, as in
training). Caches stay in onnxruntime: each step binds the previous step's outputs as the next step's inputs —
the policy state and, in protocol-1 ``ai.solm`` artifacts, each layer's Quest page min/max (``past_page_min_i``/
``past_page_max_i``, inputs with an empty default, so feeds without them still run). The KV cache follows the
artifact's protocol (``runtime/kv.py``): grown by concatenation (portable, dense), or, in the ai.solm kinds, one
buffer per layer allocated for the whole ``steps()`` call and written in place (present bound to past; in step
protocol 2 the page state too). Many requests share one run through ``batch()`` (``runtime/batch.py``: rows join
and leave between steps).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from solm_compile.artifact import protocol
from solm_compile.runtime.binding import KeptBinding
from solm_compile.errors import UserError
from solm_compile.runtime.kv import KvCache

log = logging.getLogger(__name__)

POLICY_PROTOCOL = (0, 2)   # artifacts from 0.2 on: fixed-size policy KV, episodes restarted inside the graph
HOST_OUTPUTS = ("logits", "action", "controls")   # read by the caller every step: bound in host memory
PREFILL_CHUNK = 128   # tokens per prefill run: [1, 128, V] fp32 logits (25 MB at V = 49152), not the prompt's
POLICY_STATE = ("policy_key", "policy_value", "policy_prev_action", "policy_usage", "policy_count", "policy_step",
                "policy_hidden")


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    tok_s: float
    usage: dict            # realised mean usage per axis over effective steps: attn_keep, mlp_keep, bits
    actions: list = field(default_factory=list)   # per step, per row: effective action id (solm artifacts)


def read_metadata(path: Path) -> dict:
    """The artifact's solm metadata (JSON values of the ``solm.*`` metadata props), without loading weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises a zoo of types for a broken file
        raise UserError(f"{path}: not an ONNX model or truncated ({type(e).__name__})") from e
    meta = {p.key[5:]: json.loads(p.value) for p in model.metadata_props if p.key.startswith("solm.")}
    if "kind" not in meta:
        raise UserError(f"{path}: an ONNX model without solm metadata (compile it with solm-compile)")
    return meta


def session_options(ort, threads: int | None = None, spin: bool = False):
    """solm's onnxruntime session settings: ``threads`` intra-op threads (onnxruntime's default if None), one
    inter-op thread, errors-only logging (the node-placement notice for shape ops is expected, not news), and no
    spinning unless ``spin``: an idle worker that spins takes a core another process on a shared machine needs, but
    on a machine of its own spinning is what onnxruntime, llama.cpp and onnxruntime-genai do by default, and on two
    threads it is worth 1.1-1.5x a decode step (docs/measurements.md, session 14)."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    return so


def pick_tokens(logits: np.ndarray, rng: np.random.Generator, greedy: bool = False,
                temperature: float = 1.0) -> np.ndarray:
    """The next token of each row of ``logits`` [B, V]: the argmax if ``greedy``, else a draw from
    softmax(logits / temperature) (temperature floored at 1e-6, so 0 is greedy up to ties)."""
    if greedy:
        return logits.argmax(-1)
    z = logits / max(temperature, 1e-6)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def prefill_spans(n: int, chunk: int = PREFILL_CHUNK) -> list[tuple[int, int]]:
    """[start, end) of the prefill runs of an ``n``-token prompt: ``chunk`` tokens each (0: one run), except that a
    last run of one token joins the run before it, since a one-token run after the first is a decode step (gated,
    the policy acting) and not part of a prefill."""
    if chunk <= 0 or n <= chunk:
        return [(0, n)]
    spans = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    if spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


class SolmSession:
    """One onnxruntime session over an artifact; thread-safe (each call keeps its own state)."""

    def __init__(self, path: str | Path, providers: list | None = None, threads: int | None = None,
                 use_ep: bool = True, tokenizer: bool = True, ep_options: dict | None = None,
                 profile_prefix: str | None = None, device: str = "cpu", prefill_chunk: int = PREFILL_CHUNK,
                 spin: bool = False):
        """``device`` (cpu, cuda) picks the providers when ``providers`` is None (``runtime/device.py``: CUDA first
        and the CPU last, for portable and dense artifacts); an explicit ``providers`` list wins. ``prefill_chunk``:
        the most prompt tokens one prefill run feeds (0: the whole prompt in one run). ``spin``: onnxruntime's
        intra-op threads spin between runs (``session_options``; for a machine of its own)."""
        import onnxruntime as ort

        from solm_compile.runtime.device import providers_for

        self.path = Path(path)
        if int(prefill_chunk) < 0 or int(prefill_chunk) == 1:
            raise UserError(f"--prefill-chunk {prefill_chunk}: a prefill run takes at least 2 tokens (0: one run)")
        self.prefill_chunk = int(prefill_chunk)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such artifact")
        self.meta = read_metadata(self.path)
        self.kind = self.meta["kind"]
        protocol.check(self.meta, self.path)            # docs/protocol.md: the inputs/outputs driven below
        made_by = tuple(int(x) for x in str(self.meta.get("version", "0.0")).split(".")[:2])
        if self.kind in ("solm", "portable") and made_by < POLICY_PROTOCOL:
            raise UserError(f"{self.path}: written by solm {self.meta.get('version')}, whose policy state this "
                            f"runtime no longer drives; compile it again with this solm")
        if providers is None:
            providers = providers_for(self.kind, device, ort)
        self.device = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        so = session_options(ort, threads, spin)
        if profile_prefix:  # onnxruntime's profiler (per-node times); self.sess.end_profiling() writes the JSON
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        self.ep_active = False
        if self.kind in ("solm", "fixed") and use_ep and providers is None:
            from solm_compile.runtime import ep

            so = ep.session_options_with_ep(so, ort=ort, provider_options=ep_options)
            self.ep_active = ep.is_registered()
            if not self.ep_active:
                raise UserError(f"{self.path}: a {self.kind} artifact runs its ai.solm ops on SolmEP, which is not "
                                f"available here (build it with `python -m solm_compile.runtime.ep_build`), or "
                                f"compile the model with --portable")
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{self.path}: onnxruntime cannot load it: {str(e).splitlines()[0][:200]}") from e
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.sess.get_providers():
            raise UserError(f"{self.path}: --device cuda: onnxruntime-gpu is installed but its CUDA EP did not start "
                            f"(no GPU visible, or the CUDA/cuDNN libraries it needs are missing)")
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.n_layers = int(self.meta["num_layers"])
        self.kv = KvCache.of(self.meta, self.path)       # the KV cache protocol (runtime/kv.py): concat or buffer
        # (past, present) names of the carried page state (absent in portable, dense and older artifacts); its
        # inputs have a default, so get_inputs() does not list them and _run binds them only when fed
        optional = [i.name for i in self.sess.get_overridable_initializers()]
        # (protocol 2: the page state is a buffer written in place, which self.kv drives with the KV buffers)
        self.page_state = [(f"past_page_{m}_{i}", f"present_page_{m}_{i}") for i in range(self.n_layers)
                           for m in ("min", "max") if f"past_page_{m}_{i}" in optional + self.input_names
                           and f"present_page_{m}_{i}" in self.output_names and not self.kv.paged]
        self.optional_inputs = [past for past, _ in self.page_state if past not in self.input_names]
        # where each output is bound: on CUDA the carried state stays on the GPU; what the caller reads is copied
        self.output_devices = {name: "cpu" if self.device == "cpu" or name in HOST_OUTPUTS else "cuda"
                               for name in self.output_names}
        self._alias = self.kv.aliases()                  # present -> past: the buffers written in place
        self._binding = KeptBinding(self.sess, self.input_names, self.output_names, self.optional_inputs,
                                    self._alias, self.output_devices)
        self.tokenizer = self._tokenizer() if tokenizer else None

    # ------------------------------------------------------------------------------------------ setup
    def _tokenizer(self):
        from tokenizers import Tokenizer

        name = self.meta.get("tokenizer", "tokenizer.json")
        if name is None:
            raise UserError(f"{self.path}: written without a tokenizer (a benchmark's artifact): it takes token ids "
                            f"only (SolmSession(..., tokenizer=False))")
        tok_file = self.path.parent / name
        if not tok_file.is_file():
            raise UserError(f"{self.path}: its tokenizer {tok_file.name} is missing next to it "
                            f"(solm-compile writes it beside the artifact)")
        return Tokenizer.from_file(str(tok_file))

    def check_budget(self, budget) -> np.ndarray:
        """(attn_keep, mlp_keep, bits) → the [3] target row (κ, ρ, bits/16), within the artifact's ranges."""
        names = ("--attn-keep", "--mlp-keep", "--bits")
        ranges = self.meta.get("budget_ranges", [[0.05, 1], [0.1, 1], [2, 16]])
        for name, value, (lo, hi) in zip(names, budget, ranges):
            if not lo <= float(value) <= hi:
                raise UserError(f"{name} {value} is outside this artifact's range [{lo:g}, {hi:g}]")
        return np.array([budget[0], budget[1], budget[2] / 16.0], dtype=np.float32)

    def _empty_past(self, batch: int, capacity: int = 0) -> dict:
        """The empty caches: KV (``capacity`` positions for a buffer artifact, runtime/kv.py) and page state."""
        kvh, hd = self.meta["kv_heads"], self.meta["head_dim"]
        z = np.zeros((batch, kvh, 0, hd), dtype=np.float32)                         # [B, Hkv, 0, d]
        return {**self.kv.empty(batch, capacity), **{past: z for past, _ in self.page_state}}

    def _policy_start(self, batch: int, hidden: np.ndarray) -> dict:
        ph, phd, T = self.meta["policy_heads"], self.meta["policy_head_dim"], int(self.meta["episode_len"])
        z = np.zeros((batch, ph, T, phd), dtype=np.float32)                        # [B, H, T_ep, hd] empty slots
        return {"policy_key": z, "policy_value": z.copy(),
                "policy_prev_action": np.full((batch,), self.meta["num_actions"], dtype=np.int64),
                "policy_usage": np.zeros((batch, 3), dtype=np.float32),
                "policy_count": np.zeros((batch,), dtype=np.float32),
                "policy_step": np.zeros((batch,), dtype=np.int64), "policy_hidden": hidden.astype(np.float32)}

    # ------------------------------------------------------------------------------------------ stepping
    def _run(self, feeds: dict) -> dict:
        """One run with IO binding (runtime/binding.py: kept between runs on the same ``feeds``): numpy or OrtValue
        inputs in, OrtValue outputs out (no copy to numpy); a buffer KV cache's outputs are its inputs' OrtValues
        (written in place, runtime/kv.py)."""
        return self._binding.run(feeds)

    def release(self) -> None:
        """Drop this thread's kept IO binding, and with it its hold on the last feeds' buffers: call it when those
        feeds are dropped and their memory should go before the next run."""
        self._binding.release()

    def _carry(self, out: dict, feeds: dict) -> None:
        """Feed this step's presents (KV cache, page state and policy state) into the next step's inputs."""
        self.kv.carry(out, feeds)
        alias = self._alias
        for past, present in self.page_state:
            if alias.get(present) != past:               # a buffer is written in place: feeds holds it already
                feeds[past] = out[present]
        if self.kind in ("solm", "portable"):
            for name in POLICY_STATE:
                feeds[name] = out[f"{name}_out"]

    def prefill_runs(self, n: int) -> list[tuple[int, int]]:
        """[start, end) of the runs an ``n``-token prompt is prefilled in (``prefill_spans``; one run for the concat
        kinds and the dense kind, see ``prefill``)."""
        return prefill_spans(n, self.prefill_chunk if self.kv.buffered and self.kind != "dense" else 0)

    def prefill(self, feeds: dict, ids: np.ndarray) -> np.ndarray:
        """Prefill ``ids`` [B, T] from the empty state in ``feeds`` (caches, policy state, controls), in runs of at
        most ``prefill_chunk`` tokens, each carried into ``feeds``; returns the last position's logits [B, V]. The
        concat kinds and the dense kind (its cache a buffer or not) prefill in one run: onnxruntime's
        GroupQueryAttention refuses a multi-token run after a past at B > 1."""
        B = ids.shape[0]
        for a, b in self.prefill_runs(ids.shape[1]):
            feeds["input_ids"] = ids[:, a:b]                                                     # [B, b - a]
            feeds["position_ids"] = np.tile(np.arange(a, b, dtype=np.int64), (B, 1))             # [B, b - a]
            out = self._run(feeds)
            self._carry(out, feeds)        # (every prefill run restarts each row's policy episode in the artifact)
            logits = out["logits"].numpy()[:, -1].copy()                                         # [B, V]
            del out                        # the run's logits [B, b - a, V] go before the next run's are made
        return logits

    def steps(self, prompt_ids: list[list[int]], budget=(1.0, 1.0, 16), next_token: Callable | None = None,
              max_new_tokens: int = 16, forced: list[list[int]] | None = None) -> Iterator[dict]:
        """Prefill, then one controlled step per token; yields per step {logits, action, controls}.

        ``next_token(logits [B,V]) -> [B]`` picks each next token (greedy by default); ``forced`` [B,n] feeds given
        tokens instead (teacher forcing, for ``score``). ``budget`` is one (attn_keep, mlp_keep, bits) for every row,
        or (solm, portable and fixed artifacts) a list of B of them: each row carries its own.
        """
        ids = np.asarray(prompt_ids, dtype=np.int64)
        B, T = ids.shape
        per_row = len(budget) == B and all(isinstance(b, (tuple, list)) for b in budget)
        n = len(forced[0]) if forced is not None else max_new_tokens
        feeds = self._empty_past(B, capacity=T + n)
        if per_row and self.kind == "dense":
            raise UserError(f"{self.path}: a dense artifact takes no budget, so no per-row budgets either")
        target = (np.stack([self.check_budget(b) for b in budget]) if per_row else
                  np.tile(self.check_budget(budget), (B, 1)) if self.kind != "dense" else None)
        policy = self.kind in ("solm", "portable")
        if policy:
            feeds.update(self._policy_start(B, np.zeros((B, self.meta["hidden_size"]), np.float32)), budget=target)
        elif self.kind == "fixed":    # no policy: each row's budget is fed as its controls themselves
            controls = target * np.array([1.0, 1.0, 16.0], np.float32)                        # [B, 3]
            feeds.update(attn_keep=controls[:, 0].copy(), mlp_keep=controls[:, 1].copy(), bits=controls[:, 2].copy())
        logits = self.prefill(feeds, ids)
        yield {"logits": logits, "action": None, "controls": None}
        for t in range(n):
            tok = np.asarray([r[t] for r in forced], dtype=np.int64) if forced is not None else \
                np.asarray(next_token(logits) if next_token else logits.argmax(-1), dtype=np.int64)
            feeds["input_ids"] = tok[:, None]
            feeds["position_ids"] = np.full((B, 1), T + t, dtype=np.int64)
            out = self._run(feeds)
            self._carry(out, feeds)
            logits = out["logits"].numpy()[:, -1]
            step = {"logits": logits, "token": tok, "action": None, "controls": None}
            if policy:
                step["action"], step["controls"] = out["action"].numpy(), out["controls"].numpy()
            elif self.kind == "fixed":   # the controls GateControls applies (dense while L <= ts + tw + 1)
                g = self.meta.get("gate", {})
                on = T + t + 1 > g.get("ts", 4) + g.get("tw", 2) + 1
                step["controls"] = controls.copy() if on else np.tile(np.float32([1.0, 1.0, 16.0]), (B, 1))
            yield step

    # ------------------------------------------------------------------------------------------ public API
    def batch(self, rows: int, capacity: int):
        """A continuous batch of up to ``rows`` sequences of up to ``capacity`` positions each (``runtime/batch.py``):
        one run per step for protocol-2 artifacts, else the rows stepped one after another."""
        from solm_compile.runtime.batch import make_batch

        return make_batch(self, rows, capacity)

    def chat_prompt(self, prompt: str | None, messages: list[dict] | None = None) -> str:
        """``prompt`` as the model's chat template renders one user turn and the assistant's cue (or, given
        ``messages``, that whole conversation of {role, content} turns instead)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            self.meta["chat_template"])
        return template.render(messages=messages or [{"role": "user", "content": prompt}], add_generation_prompt=True,
                               bos_token=self.meta.get("bos_token") or "", eos_token=self.meta.get("eos_token") or "")

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        """A prompt's token ids: a chat prompt through the template (which writes its own ``<bos>``), a plain one with
        the tokenizer's default special tokens (Gemma-3's ``<bos>``, without which it degenerates; none for
        SmolLM2)."""
        if chat:
            return self.tokenizer.encode(self.chat_prompt(prompt), add_special_tokens=False).ids
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def generate(self, prompt: str, max_new_tokens: int = 32, budget=(1.0, 1.0, 16), greedy: bool = True,
                 temperature: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
                 chat: bool | None = None, on_step: Callable[[dict], None] | None = None) -> GenerationResult:
        """Greedy or sampled generation for one prompt; ``on_text`` receives text as it is produced, ``on_step``
        each generated token's step: {token, action, controls (κ, ρ, bits; None if dense), L (KV length)}. ``chat``
        (default: when the artifact carries a chat template) wraps the prompt in the template as a user turn.
        Generation stops at an end-of-sequence token (not included) or after ``max_new_tokens``."""
        if self.tokenizer is None:
            raise UserError(f"{self.path}: opened without a tokenizer")
        if chat is None:
            chat = bool(self.meta.get("chat_template"))
        elif chat and not self.meta.get("chat_template"):
            raise UserError(f"{self.path}: this artifact has no chat template (compile an instruct model, or "
                            "generate without --chat)")
        ids = self.prompt_ids(prompt, chat)
        eos = set(self.meta.get("eos_token_ids") or [])
        rng = np.random.default_rng(seed)

        def pick(logits):
            return pick_tokens(logits, rng, greedy=greedy, temperature=temperature)

        tokens, actions, controls, text = [], [], [], ""
        gen = self.steps([ids], budget, next_token=pick, max_new_tokens=max_new_tokens)
        next(gen)                                   # the dense prefill
        start = time.perf_counter()
        for step in gen:                            # each step feeds the token picked from the last logits
            if int(step["token"][0]) in eos:        # the answer ended (that step's output is not used)
                break
            tokens.append(int(step["token"][0]))
            if step["action"] is not None:          # a fixed artifact reports controls but takes no action
                actions.append(int(step["action"][0]))
            if step["controls"] is not None:
                controls.append(step["controls"][0])
            if on_step is not None:
                on_step({"token": tokens[-1], "L": len(ids) + len(tokens),
                         "action": None if step["action"] is None else int(step["action"][0]),
                         "controls": None if step["controls"] is None else [float(c) for c in step["controls"][0]]})
            if on_text is not None:
                new = self.tokenizer.decode(tokens)
                on_text(new[len(text):])
                text = new
        elapsed = time.perf_counter() - start
        return GenerationResult(text=self.tokenizer.decode(tokens), tokens=tokens,
                                tok_s=len(tokens) / elapsed if elapsed > 0 else float("inf"),
                                usage=self._usage(controls), actions=actions)

    def _usage(self, controls: list) -> dict:
        if not controls:
            return {"attn_keep": 1.0, "mlp_keep": 1.0, "bits": 16.0}
        c = np.stack(controls)
        return {"attn_keep": float(c[:, 0].mean()), "mlp_keep": float(c[:, 1].mean()), "bits": float(c[:, 2].mean())}

    def score(self, ids: list[int], context: int, budget=(1.0, 1.0, 16)) -> np.ndarray:
        """Teacher-forced log-probs of ids[context:], each given the ids before it: a dense prefill of
        ids[:context], then one step per token."""
        prompt, rest = ids[:context], ids[context:]
        out = []
        gen = self.steps([prompt], budget, forced=[rest[:-1]])
        for step, target in zip(gen, rest):
            z = step["logits"][0]
            out.append(z[target] - np.log(np.exp(z - z.max()).sum()) - z.max())
        return np.asarray(out, dtype=np.float64)
