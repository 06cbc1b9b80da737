"""Deployment files: YAML parses, compose structure, Kubernetes kinds, settings exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sitiancal.service.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
FIELDS = {f"SITIANCAL_{name.upper()}" for name in Settings.model_fields}
_SETTING = re.compile(r"\bSITIANCAL_[A-Z0-9_]+\b")


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_compose_brings_up_service_scheduler_workers_postgres_and_s3():
    compose = _compose()
    services = compose["services"]
    assert {"service", "scheduler", "worker", "postgres", "minio"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
    build = services["service"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == \
        (DEPLOY / "Dockerfile").resolve()
    # service, scheduler and workers run the same image
    assert services["scheduler"]["image"] == services["worker"]["image"] == \
        services["service"]["image"]
    env = services["service"]["environment"]
    assert env["SITIANCAL_SCHEDULER_ADDRESS"] == "tcp://scheduler:8786"
    assert env["SITIANCAL_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["SITIANCAL_DATABASE_URL"]
    assert env["SITIANCAL_STORE_URL"].startswith("s3://")
    assert services["worker"]["environment"]["SITIANCAL_STORE_URL"] == env["SITIANCAL_STORE_URL"]
    assert "dask" in services["worker"]["command"] and "worker" in services["worker"]["command"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert "scheduler:8786" in " ".join(services["worker"]["command"])
    # every named volume is declared
    declared = set(compose.get("volumes", {}))
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if not src.startswith(("/", ".")):
                assert src in declared, src


def test_compose_settings_are_valid_settings():
    env = _compose()["services"]["service"]["environment"]
    values = {k[len("SITIANCAL_"):].lower(): v for k, v in env.items()
              if k.startswith("SITIANCAL_") and "${" not in str(v)}
    settings = Settings(**values)  # validates every value
    assert settings.scheduler_address == "tcp://scheduler:8786"
    assert settings.input_roots == ["/data"]


def test_kubernetes_manifests_parse_and_have_the_expected_kinds():
    docs = _k8s_docs()
    kinds = {}
    for path, doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), path
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path
        kinds.setdefault(doc["kind"], set()).add(doc.get("metadata", {}).get("name"))
    assert {"dask-worker", "dask-scheduler", "sitiancal"} <= kinds["Deployment"]
    assert {"postgres", "minio"} <= kinds["StatefulSet"]
    assert {"Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "Namespace",
            "PersistentVolumeClaim", "Kustomization"} <= set(kinds)
    # every file is listed in the kustomization
    kustomization = next(d for _, d in docs if d["kind"] == "Kustomization")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    worker = next(d for _, d in docs if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "dask-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["memory"] == "12Gi"
    hpa = next(d for _, d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dask-worker"
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    # selectors match their pod labels
    for _, doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert doc["spec"]["selector"]["matchLabels"].items() <= \
                doc["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("path", sorted(
    p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()))
def test_every_setting_referenced_exists(path):
    text = (DEPLOY / path).read_text()
    referenced = set(_SETTING.findall(text))
    unknown = referenced - FIELDS
    assert not unknown, f"{path} references settings that do not exist: {sorted(unknown)}"


def test_settings_list_documents_every_setting():
    doc = (DEPLOY / "settings.md").read_text()
    assert FIELDS <= set(_SETTING.findall(doc))
    assert "61" in doc and "60 cameras" in doc


def test_dockerfile_installs_the_package_and_runs_the_service():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.1[1-9]", text, re.M)
    assert "pip install ." in text and '"sitiancal", "serve"' in text


def test_dockerfile_ships_compiled_kernels_the_runtime_user_can_use():
    """The image compiles the kernels as the user that runs it, into a folder numba
    uses (NUMBA_CACHE_DIR): numba skips a cache folder it cannot write to."""
    text = (DEPLOY / "Dockerfile").read_text()
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", text).group(1)
    assert re.search(rf"chown sitian [^\n]*{re.escape(cache)}", text)
    user = text.index("USER sitian")
    assert text.index("RUN sitiancal compile") > user > text.index("RUN pip install .")


def _nanny_environ(env: dict) -> dict[str, str]:
    """What a dask nanny started with ``env`` adds to its worker's environment
    (dask's configuration from the environment merged over its defaults)."""
    import copy

    import dask.config
    import distributed  # noqa: F401  (its defaults)

    from sitiancal.compute.allocator import DASK_NANNY_ENVIRON

    merged = dask.config.update(copy.deepcopy(dask.config.config),
                                dask.config.collect_env({DASK_NANNY_ENVIRON: env[DASK_NANNY_ENVIRON]}))
    got = dask.config.get("distributed.nanny.pre-spawn-environ", config=merged)
    return {k: str(v) for k, v in got.items()}


def test_deployed_workers_get_a_jobs_allocator_settings():
    """compose and Kubernetes give nanny-started workers the settings of
    ``keep_freed_memory`` as glibc variables, exactly those of the allocator module."""
    from sitiancal.compute.allocator import allocator_environment

    want = allocator_environment()
    compose = _compose()["services"]
    config = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"] == "sitiancal-config")
    for env in (compose["worker"]["environment"], config["data"]):
        got = _nanny_environ(env)
        assert want.items() <= got.items()    # dask's trim threshold replaced, ...
        assert got["OMP_NUM_THREADS"] == "1"  # ... its other defaults kept
    worker = next(d for _, d in _k8s_docs() if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "dask-worker")
    refs = worker["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"configMapRef": {"name": "sitiancal-config"}} in refs
