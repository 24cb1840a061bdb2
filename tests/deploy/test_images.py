"""The Docker images install what they run, checked offline (no Docker engine, no package index).

Each Dockerfile is read for what it installs (`pip install` lines: the project with its extras, plus torch
in the worker) and which packages it copies. That install is resolved against pyproject.toml's extras and
then the installed distributions' own requirements, as pip would resolve it. The image's entry points are
then imported in a fresh interpreter that hides every distribution (and project package) the image would
not have, and every import in the project modules they load, lazy ones included, must be covered.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from embedded.processes import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
PROJECT = canonicalize_name(PYPROJECT["name"])
FIRST_PARTY = {"melfusion", "model_store", "jobs", "service", "workers", "melfusion_client", "embedded"}
IN_EVERY_PYTHON_IMAGE = {"pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel"}
# Besides CMD and HEALTHCHECK, what each image runs: the Kubernetes bundle Job runs model_store in the worker's.
ALSO_RUN = {"Dockerfile.worker": ("model_store",)}
# Lazy imports in code an image loads but never calls, each with the reason it is safe to leave out.
NEVER_CALLED = {
    "Dockerfile.worker": {"scipy": "melfusion.dataset.audio.resample: training data only (the worker uses LogMel)"},
}


@dataclass
class Image:
    requirements: list[Requirement]  # the project (with extras) and anything else pip installs
    without_dependencies: set[str]  # installed --no-deps
    packages: set[str]  # the project's packages COPY'd into it
    entry_modules: list[str]  # `python -m X` of CMD / HEALTHCHECK (and ALSO_RUN)


def read_dockerfile(text: str, also_run: tuple[str, ...] = ()) -> Image:
    lines = re.sub(r"\\\n", " ", text).splitlines()  # join continuation lines
    requirements, without_dependencies, packages, entries = [], set(), set(), list(also_run)
    for line in lines:
        words = line.split(None, 1)
        if not words or words[0] not in ("RUN", "COPY", "CMD", "HEALTHCHECK"):
            continue
        if words[0] == "COPY":
            source = words[1].split()[0]
            packages |= {source} & FIRST_PARTY
        elif words[0] == "RUN":
            for command in re.split(r"&&|;", words[1]):
                argv = shlex.split(command)
                if argv[:2] != ["pip", "install"]:
                    continue
                options_with_value = {"--index-url", "--extra-index-url", "-i", "-r", "-c"}
                values = [a for i, a in enumerate(argv[2:], 2) if not a.startswith("-")
                          and argv[i - 1] not in options_with_value]  # fmt: skip
                for value in values:
                    value = re.sub(r"\$\{?(\w+)\}?", "0", value)  # ARG versions: the name is what matters
                    requirement = Requirement(PYPROJECT["name"] + value[1:] if value.startswith(".") else value)
                    requirements.append(requirement)
                    if "--no-deps" in argv:
                        without_dependencies.add(canonicalize_name(requirement.name))
        else:
            command = words[1]
            if command.startswith("["):  # exec form
                command = " ".join(json.loads(command))
            entries += re.findall(r"python -m ([\w.]+)", command)
    return Image(requirements, without_dependencies, packages, entries)


def project_requirements(extras: set[str]) -> list[Requirement]:
    wanted = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in sorted(extras):
        wanted += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return wanted


def resolve(requirements: list[Requirement], without_dependencies: set[str] = frozenset()) -> set[str]:
    """Every distribution pip would install for `requirements` (this project from pyproject.toml, the rest
    from the installed distributions' metadata, markers evaluated here); those `without_dependencies`
    (installed --no-deps) bring none."""
    extras_seen: dict[str, set[str]] = {}
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name, extras = canonicalize_name(requirement.name), set(requirement.extras)
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        extras_seen[name] = extras_seen.get(name, set()) | extras
        if name in without_dependencies:
            continue
        if name == PROJECT:
            pending += project_requirements(extras)
            continue
        try:
            declared = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is required but not installed here, so this check cannot follow it")
        for text in declared:
            nested = Requirement(text)
            if nested.marker is None or any(nested.marker.evaluate({"extra": e}) for e in {"", *extras}):
                pending.append(nested)
    return set(extras_seen) - {PROJECT}


def importable(distributions: set[str]) -> set[str]:
    """Top-level module names those distributions provide."""
    return {module for module, owners in importlib.metadata.packages_distributions().items()
            if distributions & {canonicalize_name(owner) for owner in owners}}  # fmt: skip


IMPORT_AS_IN_THE_IMAGE = r"""
import importlib, importlib.abc, importlib.machinery, importlib.metadata, json, pkgutil, sys, sysconfig

distributions, third_party, own_packages, entry_points, also_loaded = json.loads(sys.argv[1])
allowed = set(third_party) | set(own_packages)
stdlib = sysconfig.get_paths()["stdlib"]


def in_stdlib(name):
    spec = importlib.machinery.PathFinder.find_spec(name)
    return bool(spec and spec.origin and spec.origin.startswith(stdlib) and "site-packages" not in spec.origin)


# sys.path's finder for everything but what the image lacks: top-level modules it has no distribution for
# are not found at all (so optional imports, try/except or importlib.util.find_spec, see them missing, as
# they would in the image), nor is the metadata of distributions it does not install.
class OnlyWhatTheImageHas(importlib.abc.MetaPathFinder):
    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        for found in importlib.machinery.PathFinder.find_distributions(context):
            if found.name and found.name.lower().replace("_", "-").replace(".", "-") in distributions:
                yield found

    def find_spec(self, name, path=None, target=None):
        if path is None and not (name in allowed or name in sys.stdlib_module_names or in_stdlib(name)):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = OnlyWhatTheImageHas()
for entry in entry_points:  # a package run with -m: all of it is code the image runs
    module = importlib.import_module(entry)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), entry + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
for name in also_loaded:
    importlib.import_module(name)
print(json.dumps(sorted(name for name in sys.modules if name.partition(".")[0] in own_packages)))
"""


def imported_names(path: Path, module: str) -> set[str]:
    """Absolute module names `module`'s file imports anywhere (functions included), relative ones resolved."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(".".join(part for part in (base, node.module or "") if part))
    return names


def missing_imports(image: Image, never_called: set[str] = frozenset()) -> list[str]:
    """What the image's code would fail to import: the entry points' own failures, then any import (lazy
    ones included) in the project modules they loaded that the install does not cover."""
    distributions = resolve(image.requirements, image.without_dependencies) | {PROJECT}
    third_party = importable(distributions) | IN_EVERY_PYTHON_IMAGE
    # The project modules the entry points' code imports lazily (the worker loads the engine when it starts).
    also_loaded = set()
    for entry in image.entry_modules:
        folder = PROJECT_ROOT / entry.replace(".", "/")
        for path in folder.rglob("*.py") if folder.is_dir() else [folder.with_suffix(".py")]:
            module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts).removesuffix(".__init__")
            also_loaded |= {n for n in imported_names(path, module) if n.partition(".")[0] in image.packages}
    argument = json.dumps([sorted(distributions | IN_EVERY_PYTHON_IMAGE), sorted(third_party), sorted(image.packages),
                           image.entry_modules, sorted(also_loaded)])  # fmt: skip
    done = subprocess.run([sys.executable, "-c", IMPORT_AS_IN_THE_IMAGE, argument], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    if done.returncode != 0:
        return [next(line for line in reversed(done.stderr.splitlines()) if re.match(r"\w+(Error|Exception)", line))]
    problems = []
    for module in json.loads(done.stdout):
        path = PROJECT_ROOT / module.replace(".", "/")
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for name in sorted(imported_names(path, module)):
            top = name.partition(".")[0]
            if top not in third_party | image.packages | set(sys.stdlib_module_names) | never_called:
                problems.append(f"{module} imports {top}, which the image does not install")
    return problems


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_each_image_installs_what_it_runs(dockerfile):
    image = read_dockerfile((PROJECT_ROOT / "docker" / dockerfile).read_text(), ALSO_RUN.get(dockerfile, ()))
    projects = [r for r in image.requirements if canonicalize_name(r.name) == PROJECT]
    assert len(projects) == 1 and projects[0].extras, "the project, installed with its extras"
    assert not image.without_dependencies
    hand_listed = {canonicalize_name(r.name) for r in image.requirements} - {PROJECT, "torch"}
    assert not hand_listed, f"dependencies listed by hand instead of in pyproject.toml: {hand_listed}"
    assert missing_imports(image, set(NEVER_CALLED.get(dockerfile, {}))) == []


def test_the_api_image_has_no_torch():
    image = read_dockerfile((PROJECT_ROOT / "docker" / "Dockerfile.api").read_text())
    assert not {"torch", "diffusers", "transformers"} & resolve(image.requirements, image.without_dependencies)


def test_the_check_finds_what_a_hand_listed_install_misses():
    """The API image as it was: dependencies listed by hand (no standardwebhooks, limits or sse-starlette)
    and the project installed --no-deps. It crashed at start; the check says why."""
    old = """COPY melfusion ./melfusion
COPY jobs ./jobs
COPY service ./service
RUN pip install "fastapi>=0.115" "uvicorn>=0.30" "python-multipart>=0.0.9" "pydantic>=2.7" "pydantic-settings>=2.3" \\
        "redis>=5" "rq>=2.0" "boto3>=1.34" "prometheus-client>=0.20" "httpx>=0.27" \\
        "numpy>=1.26" "pillow>=10" "soundfile>=0.12"
RUN pip install --no-deps . && useradd --create-home melfusion
CMD ["python", "-m", "service"]
"""
    image = read_dockerfile(old)
    assert image.without_dependencies == {PROJECT}
    (problem,) = missing_imports(image)
    assert re.search(r"ModuleNotFoundError: No module named '(standardwebhooks|limits|sse_starlette)'", problem), problem


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_base_image_pinned_by_digest_and_a_fixed_non_root_user(dockerfile):
    text = (PROJECT_ROOT / "docker" / dockerfile).read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}"]
    assert re.findall(r"^USER (\S+)$", text, re.M) == ["10001:10001"]  # numeric: runAsNonRoot can check it
    assert "useradd --uid 10001 --gid 10001" in text


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a context path: the last pattern matching it or a folder above it decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_bundles_outputs_caches_and_git_out_but_not_the_sources():
    patterns = [line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    for path in (".git/HEAD", ".venv/bin/python", "models/bundle/music_unet/diffusion_pytorch_model.safetensors",
                 "outputs/clip.wav", "model_store/bundles/full/manifest.json", "melfusion/__pycache__/cli.cpython-311.pyc",
                 ".pytest_cache/README.md", "melfusion_service.egg-info/PKG-INFO", ".env", "tests/conftest.py",
                 "somewhere/pytorch_model.bin"):  # fmt: skip
        assert dockerignored(path, patterns), path
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        copies = re.findall(r"^COPY (.+)$", (PROJECT_ROOT / "docker" / dockerfile).read_text(), re.M)
        for source in [source for line in copies for source in line.split()[:-1]]:
            for path in [source] if (PROJECT_ROOT / source).is_file() else [
                str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / source).rglob("*.py")
            ]:
                assert not dockerignored(path, patterns), f"{dockerfile} copies {path}, which .dockerignore drops"
