"""Per-token compute shading: the renderer on hand-made records, ``solm run --show`` under a pseudo-terminal and
through a pipe on a tiny artifact, its ``--json`` costs against the cost model evaluated here, and the HTML
report of ``solm eval --out``."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch

from solm_compile.analysis import shade
from solm_compile.analysis.cost import LayerShapes, ModelShapes, decode_cost

ESC = "\x1b["


# ---------------------------------------------------------------------------------------------- renderer
class Tty(io.StringIO):
    def isatty(self):
        return True


def _records(texts, costs):
    return [{"token": i, "text": t, "cost_fraction": c} for i, (t, c) in enumerate(zip(texts, costs))]


def test_colour_only_on_a_terminal_without_no_color():
    assert shade.use_colour(Tty(), env={})
    assert not shade.use_colour(io.StringIO(), env={})                    # a pipe / file
    assert not shade.use_colour(Tty(), env={"NO_COLOR": "1"})
    assert not shade.use_colour(Tty(), env={"TERM": "dumb"})
    recs = _records(["Hello", ",", " world"], [1.0, 0.6, 0.8])
    painted = shade.render(recs, lo=0.5, colour_on=True)
    assert painted.count("\x1b[48;2;") == 3 and painted.count(shade.RESET) == 3
    assert re.sub(r"\x1b\[[0-9;]*m", "", painted) == "Hello, world"
    plain = shade.render(recs, lo=0.5, colour_on=False)
    assert plain == "Hello, world" and ESC not in plain
    assert ESC not in shade.legend(0.5, colour_on=False) and ESC in shade.legend(0.5, colour_on=True)
    assert "\x1b[48;5;" in shade.render(recs, lo=0.5, colour_on=True, true=False)   # the 256-colour form


def test_viridis_ends_and_readable_foreground():
    assert shade.colour(0.5, lo=0.5, hi=1.0) == (68, 1, 84)             # viridis' dark purple end
    assert shade.colour(1.0, lo=0.5, hi=1.0) == (253, 231, 37)          # its yellow end
    assert shade.colour(0.75, lo=0.5, hi=1.0) == (33, 145, 140)         # its middle
    assert shade.colour(0.2, lo=0.5) == (68, 1, 84) and shade.colour(1.3, lo=0.5) == (253, 231, 37)  # clamped
    assert shade.foreground((68, 1, 84)) == (255, 255, 255) and shade.foreground((253, 231, 37)) == (0, 0, 0)
    assert shade.cube_index((0, 0, 0)) == 16 and shade.cube_index((255, 255, 255)) == 231
    assert shade.cube_index((255, 0, 0)) == 196


def test_split_utf8_character_is_joined():
    pieces = [b"caf", b"\xc3", b"\xa9", b" \xe2\x82", b"\xac5"]        # "é" and "€" each split across tokens

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    texts = shade.token_texts(decode, range(len(pieces)))
    assert texts == ["caf", "", "é", "", " €5"]
    recs = _records(texts, [1.0, 0.6, 0.8, 0.5, 0.9])
    units = shade.groups(recs)
    assert [u[0] for u in units] == ["caf", "é", " €5"]
    assert [u[1] for u in units] == pytest.approx([1.0, 0.7, 0.7])       # a joined unit shows its tokens' mean
    painted = shade.render(recs, lo=0.5, colour_on=True)
    assert painted.count("\x1b[48;2;") == 3 and "é" in painted and "\ufffd" not in painted
    assert shade.token_texts(decode, [0, 1]) == ["caf", "\ufffd"]        # a character cut off at the end


def test_sparkline_levels():
    assert shade.sparkline([i / 7 for i in range(8)]) == "▁▂▃▄▅▆▇█"
    assert shade.sparkline([0.5, 0.4, 1.0, 2.0], lo=0.5) == "▁▁██"
    assert shade.sparkline([0.5 + 0.5 * 3 / 7], lo=0.5) == "▄"
    s = shade.summary(_records(["a", "b"], [0.5, 1.0]), lo=0.5)
    assert s.startswith("▁█") and "mean 0.750" in s


# ---------------------------------------------------------------------------------------------- solm run --show
@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory, tiny_llama):
    from test_artifact import word_tokenizer
    from tiny_lm import random_policy_file
    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy import checkpoint

    d = tmp_path_factory.mktemp("show")
    loaded = models._from_hf(tiny_llama, word_tokenizer(), name="tiny", source="<test>")
    lm = GatedLM.from_loaded(loaded)
    pf = random_policy_file(d / "p.pt", checkpoint.model_identity(lm.info), lm.gate)
    lp = checkpoint.load_policy(pf, lm.info)
    return write_artifact(lm, d / "tiny.portable.onnx", "portable", lp, tokenizer=loaded.tokenizer)


def _argv(art, *extra):
    from test_artifact import PROMPT

    return ["run", str(art), "--prompt", PROMPT, "--max-new-tokens", "12", "--greedy", "--no-chat",
            "--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "8", "--threads", "1", *extra]


def _spawn_in_pty(argv, env) -> str:
    """Run ``python -m solm_compile ARGV`` with stdout on a pseudo-terminal; returns what it wrote there."""
    master, slave = os.openpty()
    p = subprocess.Popen([sys.executable, "-m", "solm_compile", *argv], stdout=slave, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        r, _, _ = select.select([master], [], [], 60)
        if not r:
            break
        try:
            data = os.read(master, 4096)
        except OSError:                      # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert p.wait(timeout=60) == 0, p.stderr.read().decode()[-2000:]
    return b"".join(chunks).decode("utf-8", errors="replace")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", COLORTERM="truecolor", **extra)
    return env


def test_run_show_through_a_pipe_is_plain(tiny_art):
    p = subprocess.run([sys.executable, "-m", "solm_compile", *_argv(tiny_art, "--show")], capture_output=True,
                       text=True, env=_env(), timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert ESC not in p.stdout and re.search("[▁▂▃▄▅▆▇█]{12}", p.stdout)   # one bar per generated token
    assert "mean" in p.stdout and "of the dense budget's bytes" in p.stdout


def test_run_show_colours_a_terminal(tiny_art):
    from test_artifact import PROMPT
    from solm_compile.runtime.session import SolmSession

    tty = _spawn_in_pty(_argv(tiny_art, "--show"), _env())
    assert "\x1b[48;2;" in tty and "compute per token" in tty and "mean" in tty
    assert re.search("[▁▂▃▄▅▆▇█]{12}", tty)
    want = SolmSession(tiny_art).generate(PROMPT, 12, (0.5, 0.75, 8), greedy=True, chat=False).text
    strip = re.sub(r"\x1b\[[0-9;]*m", "", tty).replace("\r\n", "\n")
    assert strip.splitlines()[0] == PROMPT + want                       # the answer itself, only coloured


def test_run_show_with_no_color_on_a_terminal_is_plain(tiny_art):
    assert ESC not in _spawn_in_pty(_argv(tiny_art, "--show"), _env(NO_COLOR="1"))


def test_run_json_costs_equal_the_cost_model(tiny_art, tiny_llama, capsys):
    from test_artifact import PROMPT
    from solm_compile.cli import app as cli
    from solm_compile.config import GateConfig
    from solm_compile.runtime.session import SolmSession

    assert cli.main(_argv(tiny_art, "--json")) == 0
    r = json.loads(capsys.readouterr().out)
    recs = r["per_token"]
    assert [x["token"] for x in recs] == r["tokens"] and len(recs) == 12
    assert "".join(x["text"] for x in recs) == r["text"]
    # the same greedy run stepped by hand: each generated token's step, its controls
    sess = SolmSession(tiny_art)
    prompt = sess.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    steps = list(sess.steps([prompt], (0.5, 0.75, 8), max_new_tokens=12))[1:]
    cfg = tiny_llama.config
    d = cfg.hidden_size // cfg.num_attention_heads
    layer = LayerShapes(D=cfg.hidden_size, H=cfg.num_attention_heads, Hkv=cfg.num_key_value_heads, d=d,
                        I=cfg.intermediate_size)
    cost = decode_cost(ModelShapes(layers=(layer,) * cfg.num_hidden_layers, vocab=cfg.vocab_size, D=cfg.hidden_size),
                       GateConfig())
    for i, (rec, st) in enumerate(zip(recs, steps)):
        assert rec["token"] == int(st["token"][0]) and rec["action"] == int(st["action"][0])
        k, rho, bits = (float(c) for c in st["controls"][0])
        assert rec["controls"] == pytest.approx([k, rho, bits])
        L = len(prompt) + i + 1                                           # the KV length of the step fed token i
        want = cost.at(L, round(k, 6), round(rho, 6), round(bits, 6))["bytes"] / cost.at(L)["bytes"]
        assert rec["cost_fraction"] == pytest.approx(want, rel=1e-9)
    assert len({round(x["cost_fraction"], 9) for x in recs}) > 1          # a random policy varies its compute
    assert r["mean_cost_fraction"] == pytest.approx(sum(x["cost_fraction"] for x in recs) / 12)


# ---------------------------------------------------------------------------------------------- eval HTML
class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self.imgs, self.tables, self._in = [], [], 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and a.get("class") == "t":
            self._in = {**a, "text": ""}
            self.spans.append(self._in)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self.tables += 1

    def handle_endtag(self, tag):
        if tag == "span":
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in["text"] += data


def test_eval_out_writes_a_shaded_html_report(capsys, tmp_path):
    from test_evaluate import CTX, T, _tiny_model_and_policy
    from solm_compile.cli import app as cli
    from solm_compile.config import GateConfig
    from solm_compile.data import corpora as d
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    model_dir = _tiny_model_and_policy(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("it is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife; <b>&amp</b>\n" * 8)
    code = cli.main([str(a) for a in ("eval", model_dir, "--policy", tmp_path / "p.pt", "--data", text, "--attn-keep",
                                      "0.5", "--mlp-keep", "0.75", "--bits", "8", "--blocks", "3", "--ctx", CTX,
                                      "--T", T, "--methods", "dense", "--out", tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    page = (tmp_path / "run.html").read_text(encoding="utf-8")
    result = json.loads((tmp_path / "run.json").read_text())
    assert "<b>" not in page and "<script" not in page and "http" not in page    # escaped, no script, no CDN
    parser = _Spans()
    parser.feed(page)
    assert parser.tables == 1 and not parser.imgs                       # no sweep here: no plot to embed
    # the passages are the first 3 evaluated blocks; rebuild them independently
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = d.token_blocks(tok, [text.read_text()], CTX + T + 1, 3, seed=0)
    assert len(parser.spans) == 3 * T                                   # one span per controlled token
    cfg = json.loads((model_dir / "config.json").read_text())
    layer = LayerShapes(D=cfg["hidden_size"], H=cfg["num_attention_heads"], Hkv=cfg["num_key_value_heads"],
                        d=cfg["hidden_size"] // cfg["num_attention_heads"], I=cfg["intermediate_size"])
    cost = decode_cost(ModelShapes(layers=(layer,) * cfg["num_hidden_layers"], vocab=cfg["vocab_size"],
                                   D=cfg["hidden_size"]), GateConfig())
    kappas = []
    for b in range(3):
        for t in range(T):
            span = parser.spans[b * T + t]
            want_char = tok.convert_ids_to_tokens(int(blocks[b, CTX + t]))
            assert want_char in span["text"], (b, t, span["text"], want_char)        # every token, in order
            k, rho, bits = (float(x) for x in re.search(r"κ (\S+) ρ (\S+) bits (\S+):", span["title"]).groups())
            L = CTX + t + 1
            want = cost.at(L, k, rho, bits)["bytes"] / cost.at(L)["bytes"]
            assert float(span["data-cost"]) == pytest.approx(want, abs=1e-6)
            lo = float(re.search(r'<div class="legend"><span>([0-9.]+)</span>', page).group(1))
            assert f"background:{shade.hex_colour(shade.colour(want, lo))}" in span["style"]
            kappas.append(k)
    # all of the blocks are shown, so their κ is the policy's realised usage
    assert sum(kappas) / len(kappas) == pytest.approx(result["matched_usage"]["attn_keep"], abs=1e-6)
