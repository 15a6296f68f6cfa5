"""Regenerate taskservice/_proto from protos/ (the one way to do it).

Usage: python protos/generate.py [--check]

--check regenerates into a temporary folder and exits 1 if the committed
code differs, so CI catches a proto edited without regenerating.

The generator is pinned (grpcio-tools and mypy-protobuf, `==` in
pyproject.toml's dev extra) and this script refuses any other version: the
generated code is then the same on every machine, and the runtime floors that
pyproject.toml declares are the ones that code really needs.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
import tomllib
from importlib import metadata, resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "taskservice" / "_proto"
# Generated modules import each other as top-level `taskservice.v1`; rewrite
# that to the package they live in so no sys.path tricks are needed.
IMPORT_FROM = "from taskservice.v1 import"
IMPORT_TO = "from taskservice._proto.taskservice.v1 import"
DESCRIPTOR_SET = "descriptors.binpb"
# What writes taskservice/_proto; each is pinned with `==` in the dev extra.
GENERATOR = ("grpcio-tools", "mypy-protobuf")


def pinned_generator() -> dict[str, str]:
    """The generator's versions as pyproject.toml's dev extra pins them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for requirement in pyproject["project"]["optional-dependencies"]["dev"]:
        name, pinned, version = requirement.partition("==")
        if name.strip() in GENERATOR and pinned:
            pins[name.strip()] = version.strip()
    unpinned = [name for name in GENERATOR if name not in pins]
    if unpinned:
        raise SystemExit(f"pyproject.toml's dev extra must pin {', '.join(unpinned)} with ==")
    return pins


def check_generator() -> None:
    """Exit with what to install unless the pinned generator is installed here."""
    pins = pinned_generator()
    wrong = []
    for name, want in pins.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != want:
            wrong.append(f"{name} {have}, pinned {want}")
    if wrong:
        install = " ".join(f"{name}=={version}" for name, version in pins.items())
        raise SystemExit(
            "protos/generate.py runs only with the pinned generator (pyproject.toml's dev"
            " extra), so taskservice/_proto is the same wherever it is made:\n  "
            + "\n  ".join(wrong)
            + f"\ninstall it: pip install -e '.[dev]'  (or: pip install {install})"
        )


def generate(out: Path) -> None:
    check_generator()
    # Imported once the version is known to be the pinned one.
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    # The mypy plugins are scripts beside this interpreter, which need not be
    # on PATH (a venv used without activating it).
    bindir = Path(sys.executable).parent
    plugins = [
        f"--plugin=protoc-gen-{name}={bindir / f'protoc-gen-{name}'}"
        for name in ("mypy", "mypy_grpc")
    ]
    code = protoc.main(
        [
            "grpc_tools.protoc",
            *plugins,
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            # protoc's Python output drops comments; this descriptor set keeps
            # them, so server reflection (grpcurl describe) shows the docs.
            "--include_source_info",
            f"--descriptor_set_out={out / DESCRIPTOR_SET}",
            *sources,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    for path in out.rglob("*.py*"):
        if path.suffix not in {".py", ".pyi"}:
            continue
        text = path.read_text()
        if IMPORT_FROM in text:
            path.write_text(text.replace(IMPORT_FROM, IMPORT_TO))
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def _files(root: Path) -> set[Path]:
    return {
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def differences(a: Path, b: Path) -> list[str]:
    files_a, files_b = _files(a), _files(b)
    diff = sorted(str(p) for p in files_a ^ files_b)
    for rel in sorted(files_a & files_b):
        if not filecmp.cmp(a / rel, b / rel, shallow=False):
            diff.append(str(rel))
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if taskservice/_proto is stale")
    args = parser.parse_args()
    if not args.check:
        if OUT.exists():
            shutil.rmtree(OUT)
        generate(OUT)
        print(f"generated {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        generate(fresh)
        diff = differences(fresh, OUT)
    if diff:
        print("taskservice/_proto is stale; run `python protos/generate.py`:", *diff, sep="\n  ")
        return 1
    print("taskservice/_proto matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
