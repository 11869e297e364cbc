"""docs/protocol.md against real artifacts: its input, output and metadata tables are read and compared, row by
row and in order, with a tiny artifact of each kind, so the page cannot drift from the code; an artifact of an
unknown protocol version is refused in one line."""

import json
import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from solm_compile.artifact.protocol import BUFFER_PROTOCOL, PROTOCOL, SUPPORTED
from solm_compile.errors import UserError
from solm_compile.runtime.session import SolmSession, read_metadata

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
KINDS = ("solm", "fixed", "dense", "portable")
DTYPES = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
STATIC = {"Hkv": "kv_heads", "d": "head_dim", "V": "vocab_size", "D": "hidden_size", "Hp": "policy_heads",
          "Tep": "episode_len", "dp": "policy_head_dim"}
TYPES = {"int": int, "str": str, "dict": dict, "list": list}


def table(section: str) -> list[list[str]]:
    """The rows of the table under ``## section`` (cells stripped; the name and kinds columns first)."""
    body = DOC.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| `")]


def kinds_of(cell: str) -> tuple:
    return KINDS if cell == "all" else tuple(k.strip() for k in cell.split(","))


def expand(rows: list[list[str]], kind: str, n_layers: int) -> list[tuple[str, str, str]]:
    """(name, dtype, shape) of ``kind``, in order: the names of a row with ``{i}`` repeat layer by layer."""
    out = []
    for row in rows:
        if kind not in kinds_of(row[1]):
            continue
        names = re.findall(r"`([^`]+)`", row[0])
        layers = range(n_layers) if "{i}" in row[0] else [None]
        out += [(n.replace("{i}", str(i)), row[2], row[3]) for i in layers for n in names]
    return out


def graph_io(path) -> tuple[list, list]:
    g = onnx.load(str(path), load_external_data=False).graph
    return list(g.input), list(g.output)


def check_value(v, dtype: str, shape: str, meta: dict) -> None:
    want = DTYPES[meta["kv_cache"]["dtype"] if dtype == "kv_dtype" else dtype]
    t = v.type.tensor_type
    assert t.elem_type == want, f"{v.name}: dtype {TensorProto.DataType.Name(t.elem_type)}, the doc says {dtype}"
    symbols = [s.strip() for s in shape.strip("[]").split(",")]
    dims = list(t.shape.dim)
    assert len(dims) == len(symbols), f"{v.name}: rank {len(dims)}, the doc says {shape}"
    for sym, dim in zip(symbols, dims):
        if sym in STATIC or sym.isdigit():
            fixed = meta[STATIC[sym]] if sym in STATIC else int(sym)
            assert dim.HasField("dim_value") and dim.dim_value == fixed, f"{v.name}: dim {dim} is not {sym}={fixed}"
        else:                                    # B, T, C, P, P+T, pages_*: a dynamic dim, never a fixed size
            assert not dim.HasField("dim_value"), f"{v.name}: {sym} is fixed to {dim.dim_value} in the graph"


@pytest.mark.parametrize("kind", KINDS)
def test_the_docs_tables_are_the_artifacts_inputs_and_outputs(step_artifacts, kind):
    meta = read_metadata(step_artifacts[kind])
    ins, outs = graph_io(step_artifacts[kind])
    for section, values in (("Inputs", ins), ("Outputs", outs)):
        documented = expand(table(section), kind, meta["num_layers"])
        assert [n for n, _, _ in documented] == [v.name for v in values], f"{kind} {section}"
        for (_, dtype, shape), v in zip(documented, values):
            check_value(v, dtype, shape, meta)


@pytest.mark.parametrize("kind", KINDS)
def test_the_docs_metadata_table_is_the_artifacts_metadata(step_artifacts, kind):
    meta = read_metadata(step_artifacts[kind])
    rows = table("Metadata the protocol uses")
    assert len(rows) >= 10
    for key, kinds, typ, _ in rows:
        key = key.strip("`")
        if kind in kinds_of(kinds):
            assert isinstance(meta.get(key), TYPES[typ]), f"{kind}: solm.{key} is {meta.get(key)!r}, not a {typ}"
        else:
            assert key not in meta, f"{kind}: solm.{key} is there, the doc says only {kinds}"
    assert meta["protocol"] == (BUFFER_PROTOCOL if kind in ("solm", "fixed") else PROTOCOL)
    assert BUFFER_PROTOCOL == int(re.search(r"^# The step protocol \(version (\d+)\)", DOC.read_text()).group(1))


@pytest.mark.parametrize("version", [max(SUPPORTED) + 1, "1"])
def test_a_session_refuses_an_unknown_protocol_version_in_one_line(step_artifacts, tmp_path, version):
    model = onnx.load(str(step_artifacts["dense"]))
    prop = next(p for p in model.metadata_props if p.key == "solm.protocol")
    prop.value = json.dumps(version)
    onnx.save(model, str(tmp_path / "future.dense.onnx"))
    with pytest.raises(UserError, match=r"step protocol .* is not one this runtime drives") as e:
        SolmSession(tmp_path / "future.dense.onnx", tokenizer=False)
    assert "\n" not in str(e.value)
    SolmSession(step_artifacts["dense"], tokenizer=False)          # the version it knows opens
