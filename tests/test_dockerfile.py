"""images/Dockerfile: linted with hadolint, and its pins checked against pyproject.toml.

No container engine runs here, so the image is never built in the tests. What can go wrong without a build
is checked statically: lint findings, pins that drift from pyproject, a root user, a missing entrypoint.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from finetune_operator.worker import ppo_runtime
from tests.install_tools import ROOT, run, venv_tool

DOCKERFILE = ROOT / "images" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([A-Za-z0-9.+!-]+)$")


@dataclass
class Stage:
    """One build stage: its base image, name and instructions (continuation lines joined)."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARGs (before the first FROM) and the stages by name."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), match.group(1))
            current = stages[match.group(2)] = Stage(base=base, name=match.group(2))
        elif current is None:
            assert keyword == "ARG", line
            name, _, value = args.partition("=")
            global_args[name.strip()] = value.strip()
        else:
            current.instructions.append((keyword, args.strip()))
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def pyproject_pins() -> dict[str, str]:
    """Every exact pin of pyproject.toml (dependencies and all extras), by normalised name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = {}
    for requirement in requirements:
        match = PIN.match(requirement.replace(" ", ""))
        assert match, f"pyproject pins exactly: {requirement}"
        pins[_norm(match.group(1))] = match.group(2)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The argument lists of every `pip install` in a stage's RUN instructions (shell-tokenised, so that `;`
    inside a quoted `python -c` does not split a command)."""
    found = []
    separators = {"&&", "||", ";", "then", "else", "fi", "do", "done", "(", ")", "$(", "|"}
    for run_args in stage.all("RUN"):
        lexer = shlex.shlex(run_args.replace("python -m pip", "pip"), posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in separators:
                if command[:2] == ["pip", "install"]:
                    found.append(command[2:])
                command = []
            else:
                command.append(token)
    return found


def test_hadolint_passes() -> None:
    proc = run([venv_tool("hadolint"), "--failure-threshold", "info", DOCKERFILE], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_problems(tmp_path: Path) -> None:
    """Guards the test above against a hadolint that accepts anything."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    proc = run([venv_tool("hadolint"), bad], check=False)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013"):
        assert rule in proc.stdout


def test_targets_exist_and_bases_are_pinned(stages: dict[str, Stage]) -> None:
    assert {"operator", "worker"} <= set(stages)
    for stage in stages.values():
        if stage.base in stages:  # FROM another stage
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and re.fullmatch(r"\d[\w.-]*", tag), f"{stage.name}: base {stage.base} is not pinned to a version"


def test_cuda_torch_base_matches_the_torch_pin(stages: dict[str, Stage], pyproject_pins: dict[str, str]) -> None:
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", stages["worker"].base)
    assert match, f"worker base is a pinned CUDA PyTorch image: {stages['worker'].base}"
    assert match.group(1) == pyproject_pins["torch"]


def test_operator_base_satisfies_requires_python(stages: dict[str, Stage]) -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in re.fullmatch(r">=(\d+)\.(\d+)", requires).groups())  # type: ignore[union-attr]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-\w+", stages["operator"].base)
    assert match, stages["operator"].base
    assert (int(match.group(1)), int(match.group(2))) >= minimum


def test_every_pip_install_is_pinned_and_agrees_with_pyproject(
    stages: dict[str, Stage], pyproject_pins: dict[str, str]
) -> None:
    seen: dict[str, str] = {}
    for stage in stages.values():
        for args in _pip_installs(stage):
            if "--target" in args:
                continue  # the trl of ppo stages, in a folder of its own: test_ppo_trl_folder_agrees_with_...
            for arg in args:
                if arg.startswith("-") or arg in {"."}:
                    continue
                if arg.startswith(("/wheels/", "${WHEEL}", '"${WHEEL}', "${FLASH_ATTN_WHEEL_URL}")):
                    continue  # our own wheel (pins from pyproject) or an explicit wheel URL checked in the RUN
                if arg == "/requirements-train.txt":
                    continue  # pyproject's own pins, written by the `requirements` stage
                match = PIN.match(arg)
                assert match, f"{stage.name}: unpinned pip install argument {arg!r}"
                name, version = _norm(match.group(1)), match.group(2)
                seen[name] = version
                if name in pyproject_pins:
                    assert version == pyproject_pins[name], (
                        f"{name}: Dockerfile {version}, pyproject {pyproject_pins[name]}"
                    )
    # The GPU-only packages are there (QLoRA needs bitsandbytes), and LLaMA-Factory is pinned.
    assert {"llamafactory", "bitsandbytes", "liger-kernel"} <= set(seen)


def test_llamafactory_pin_agrees_with_the_development_setup(stages: dict[str, Stage]) -> None:
    """pyproject cannot pin llamafactory (it is installed with --no-deps); the setup script and the image must
    install the same release."""
    (dockerfile_pin,) = {a for args in _pip_installs(stages["worker"]) for a in args if a.startswith("llamafactory==")}
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert set(re.findall(r"llamafactory==[\w.]+", setup)) == {dockerfile_pin}


def test_boto3_pins_agree_with_the_development_setup(stages: dict[str, Stage]) -> None:
    """boto3/botocore/s3transfer are installed with --no-deps (botocore's python-dateutil<3 clashes with the
    Kubernetes client's >=3), so pyproject cannot pin them: the setup script and the image must agree."""
    names = ("boto3==", "botocore==", "s3transfer==")
    (install,) = [args for args in _pip_installs(stages["worker"]) if any(a.startswith(names) for a in args)]
    assert "--no-deps" in install
    pins = {a for a in install if a.startswith(names)}
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert set(re.findall(r"(?:boto3|botocore|s3transfer)==[\w.]+", setup)) == pins
    assert len(pins) == 3


def test_worker_installs_the_train_extra_and_llamafactory_without_deps(stages: dict[str, Stage]) -> None:
    installs = _pip_installs(stages["worker"])
    assert any(any(a.endswith(("[train]", "[train,publish]")) for a in args) for args in installs), (
        "the train extra carries the pins"
    )
    assert any(any(a.endswith("[train,publish]") for a in args) for args in installs), "the worker image publishes"
    (lf_install,) = [args for args in installs if any(a.startswith("llamafactory==") for a in args)]
    assert "--no-deps" in lf_install
    flash = stages["worker"].all("ARG")
    assert any(a.startswith("FLASH_ATTN_VERSION=") for a in flash)


def test_operator_image_has_no_torch(stages: dict[str, Stage]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_norm(PIN.match(r.replace(" ", "")).group(1)) for r in project["dependencies"]}  # type: ignore[union-attr]
    assert not runtime & {"torch", "llamafactory", "deepspeed", "transformers"}
    for args in _pip_installs(stages["operator"]):
        assert not any("[" in a for a in args), "the operator installs no extras"
        assert not any(a.split("==")[0] in {"torch", "llamafactory", "deepspeed"} for a in args)


@pytest.mark.parametrize("target", ["operator", "worker"])
def test_runtime_conventions(stages: dict[str, Stage], target: str) -> None:
    stage = stages[target]
    users = stage.all("USER")
    assert users, f"{target}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{target}: the final USER must be a numeric non-root UID"
    assert stage.all("ENTRYPOINT") == ['["ftctl"]']
    assert not stage.all("HEALTHCHECK")
    labels = " ".join(stage.all("LABEL"))
    for key in ("title", "description", "source", "licenses", "version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{target}: OCI label {key} missing"
    env = " ".join(stage.all("ENV"))
    assert "HOME=/tmp" in env
    if target == "worker":
        assert "HF_HOME=/tmp/hf-home" in env


def test_dockerignore_keeps_the_context_small() -> None:
    """The context holds only what the stages COPY: no virtualenvs, tools, git history or test data."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for stage in parse(DOCKERFILE.read_text())[1].values():
        for args in stage.all("COPY"):
            if args.startswith("--from"):
                continue
            copied.update(p.rstrip("/").removeprefix("./") for p in args.split()[:-1])
    assert copied == allowed


def test_ppo_trl_folder_agrees_with_the_worker_and_the_development_setup(stages: dict[str, Stage]) -> None:
    """LLaMA-Factory's PPO trainer needs an older trl than the rest of it (worker/ppo_runtime.py): the image
    installs exactly ppo_runtime.REQUIREMENTS, without their dependencies, into the folder the worker looks in by
    default, and the development setup installs the same pins; both drop trl's stray top-level `tests` package."""
    (install,) = [args for args in _pip_installs(stages["worker"]) if "--target" in args]
    assert "--no-deps" in install
    assert install[install.index("--target") + 1] == ppo_runtime.DEFAULT_PATH
    pins = tuple(a for a in install if PIN.match(a))
    assert pins == ppo_runtime.REQUIREMENTS
    worker_runs = " ".join(stages["worker"].all("RUN"))
    assert f"rm -rf {ppo_runtime.DEFAULT_PATH}/tests" in worker_runs
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    (setup_pins,) = re.findall(r'^PPO_TRL="([^"]+)"$', setup, flags=re.MULTILINE)
    assert tuple(setup_pins.split()) == ppo_runtime.REQUIREMENTS
    assert "--no-deps --target .venv-trl-ppo $PPO_TRL" in setup
    # The trl pinned there is one LLaMA-Factory's PPO trainer accepts.
    (trl,) = [p for p in pins if p.startswith("trl==")]
    low, high = ppo_runtime.TRL_ACCEPTED
    assert low <= tuple(int(x) for x in trl.removeprefix("trl==").split(".")) <= high
