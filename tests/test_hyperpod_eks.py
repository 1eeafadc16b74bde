"""hyperpod-eks: seis launch / status / logs / cancel / doctor through the real `kubernetes` client, over HTTP.

No Kubernetes API server can run on this machine (no container runtime; neither Debian nor PyPI ships a
kube-apiserver), so the client is tested at its HTTP boundary: a local server speaks the API paths seis uses
(custom objects of sagemaker.amazonaws.com/v1 hyperpodpytorchjobs, pods, pod logs), checks the bearer token
of the kubeconfig context, and plays the training operator by setting conditions and serving pod logs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from tests.test_hyperpod_render import validate_manifest

TOKEN = "seis-test-token"
JOBS = re.compile(r"^/apis/sagemaker\.amazonaws\.com/v1/namespaces/([^/]+)/hyperpodpytorchjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


class FakeApi:
    """What the API server and the HyperPod training operator would hold."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, list[dict[str, Any]]] = {}  # job name -> pods
        self.logs: dict[str, str] = {}  # pod name -> its log
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def start_pods(self, job: str, nodes: int, per_node: int) -> None:
        pods = []
        for i in range(nodes):
            name = f"{job}-pods-{i}"
            pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "namespace": "team-a", "labels": {"seis/job": job}},
                    "spec": {"nodeName": f"ip-10-1-0-{i + 1}", "containers": [{"name": "pytorch", "image": "img"}]},
                    "status": {"phase": "Running"},
                }
            )
            self.logs[name] = "".join(
                f"[default{k}]:step {s}/10 loss 0.{s} (node {i}, rank {i * per_node + k})\n"
                for s in (1, 2)
                for k in range(per_node)
            )
        self.pods[job] = pods

    def set_condition(self, name: str, kind: str, restarts: int = 0) -> None:
        job = next(j for (_, n), j in self.jobs.items() if n == name)
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        for c in conditions:
            c["status"] = "False"
        conditions.append({"type": kind, "status": "True", "message": f"job {kind.lower()}"})
        job["status"] |= {"restartCount": restarts, "startTime": "2026-11-24T12:00:00Z"}


def _handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, reason: str, message: str) -> None:
            self._send(
                code, {"kind": "Status", "status": "Failure", "reason": reason, "message": message, "code": code}
            )

        def _route(self, method: str) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            with api.lock:
                api.requests.append((method, self.path))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._status(401, "Unauthorized", "no or wrong token")
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if m := JOBS.match(url.path):
                ns, name = m.groups()
                if method == "POST" and name is None:
                    key = (ns, body["metadata"]["name"])
                    if key in api.jobs:
                        return self._status(409, "AlreadyExists", f'hyperpodpytorchjobs "{key[1]}" already exists')
                    api.jobs[key] = body
                    return self._send(201, body)
                if method == "GET" and name is None:
                    items = [j for (n, _), j in api.jobs.items() if n == ns]
                    return self._send(200, {"apiVersion": "sagemaker.amazonaws.com/v1", "items": items})
                if (ns, name) not in api.jobs:
                    return self._status(404, "NotFound", f'hyperpodpytorchjobs "{name}" not found')
                if method == "GET":
                    return self._send(200, api.jobs[(ns, name)])
                if method == "DELETE":
                    policy = query.get("propagationPolicy", [(body or {}).get("propagationPolicy")])[0]
                    if policy != "Foreground":  # pods go with the job, and the job only after its pods
                        return self._status(400, "BadRequest", f"propagationPolicy {policy!r}")
                    api.pods.pop(name, None)
                    return self._send(200, api.jobs.pop((ns, name)))
            if (m := PODS.match(url.path)) and method == "GET":
                selector = query.get("labelSelector", [""])[0]
                job = selector.removeprefix("seis/job=")
                return self._send(
                    200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": api.pods.get(job, [])}
                )
            if (m := LOG.match(url.path)) and method == "GET":
                text = api.logs.get(m.group(2))
                if text is None:
                    return self._status(404, "NotFound", "no such pod")
                if "tailLines" in query:
                    n = int(query["tailLines"][0])
                    text = "".join(text.splitlines(keepends=True)[-n:]) if n else ""
                return self._send(200, text, "text/plain")
            return self._status(404, "NotFound", f"{method} {url.path}")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


@pytest.fixture
def k8s(tmp_path: Path) -> Iterator[tuple[FakeApi, dict[str, str]]]:
    api = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "hp", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}},
                    {"name": "elsewhere", "cluster": {"server": "http://127.0.0.1:9"}},
                ],
                "users": [{"name": "me", "user": {"token": TOKEN}}],
                "contexts": [
                    {"name": "hyperpod", "context": {"cluster": "hp", "user": "me"}},
                    {"name": "other", "context": {"cluster": "elsewhere", "user": "me"}},
                ],
                "current-context": "other",  # the profile's context must be the one used
            }
        )
    )
    fsx = tmp_path / "fsx"
    (fsx / "runs").mkdir(parents=True)
    profile = tmp_path / "eks.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "type": "hyperpod-eks",
                "nodes": 16,
                "gpus_per_node": 8,
                "cpus_per_node": 192,
                "efa_per_node": 16,
                "instance_type": "ml.p5en.48xlarge",
                "container_image": "123456789012.dkr.ecr.us-west-2.amazonaws.com/seis:1",
                "shared_dir": str(fsx),
                "eks": {"namespace": "team-a", "context": "hyperpod", "shared_pvc": "fsx-claim", "max_retries": 5},
            }
        )
    )
    env = {"KUBECONFIG": str(kubeconfig), "SEIS_RUNS_DIR": str(fsx / "runs"), "SEIS_CLUSTER": str(profile)}
    yield api, env
    server.shutdown()
    server.server_close()


def seis(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def status(env: dict[str, str], ref: str) -> dict[str, Any]:
    out = seis(env, "status", "--json", ref)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def test_launch_status_logs_cancel(k8s: tuple[FakeApi, dict[str, str]]) -> None:
    api, env = k8s
    out = seis(env, "launch", "pretrain", "--nodes", "2", "--name", "hp-eks")
    assert out.returncode == 0, out.stdout + out.stderr
    ((ns, name), body), *rest = api.jobs.items()
    assert not rest and ns == "team-a" and name.startswith("hp-eks-")
    # What reached the API server is the run's job.yaml, and AWS's models accept it.
    (run_dir,) = Path(env["SEIS_RUNS_DIR"]).glob("hp-eks/*")
    assert body == yaml.safe_load((run_dir / "job.yaml").read_text())
    validate_manifest(body)
    container = body["spec"]["replicaSpecs"][0]["template"]["spec"]["containers"][0]
    assert body["spec"]["replicaSpecs"][0]["replicas"] == 2
    assert container["command"][-1] == str(run_dir)
    sub = json.loads((run_dir / "submission.json").read_text())
    assert sub["backend"] == "hyperpod-eks" and sub["job_id"] == f"team-a/{name}"
    assert sub["kube_context"] == "hyperpod"

    assert status(env, "hp-eks")["state"] == "PENDING"
    api.set_condition(name, "Created")
    api.set_condition(name, "Running")
    api.start_pods(name, nodes=2, per_node=8)
    row = status(env, "hp-eks")
    assert row["state"] == "RUNNING" and row["node_list"] == ["ip-10-1-0-1", "ip-10-1-0-2"]
    api.set_condition(name, "Restarting", restarts=1)
    assert status(env, "hp-eks")["state"] == "REQUEUED"

    logs = seis(env, "logs", "hp-eks")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.count("\n") == 16 and "(node 0, rank 0)" in logs.stdout and "node 1" not in logs.stdout
    rank = seis(env, "logs", "hp-eks", "--rank", "9")
    assert rank.stdout.splitlines() == [f"[default1]:step {s}/10 loss 0.{s} (node 1, rank 9)" for s in (1, 2)]
    tail = seis(env, "logs", "hp-eks", "--node", "ip-10-1-0-2", "--tail", "3")
    assert tail.stdout.splitlines() == [f"[default{k}]:step 2/10 loss 0.2 (node 1, rank {8 + k})" for k in (5, 6, 7)]
    bad = seis(env, "logs", "hp-eks", "--node", "nope")
    assert bad.returncode == 1 and "ip-10-1-0-1, ip-10-1-0-2" in bad.stderr

    cancel = seis(env, "cancel", "hp-eks")
    assert cancel.returncode == 0, cancel.stderr
    job_path = f"/apis/sagemaker.amazonaws.com/v1/namespaces/team-a/hyperpodpytorchjobs/{name}?"
    assert [m for m, path in api.requests if path.startswith(job_path)] == ["DELETE"]
    assert not api.jobs and status(env, "hp-eks")["state"] == "CANCELLED"


def test_completed_and_failed_states(k8s: tuple[FakeApi, dict[str, str]]) -> None:
    api, env = k8s
    for run, final, want in (("ok", "Succeeded", "COMPLETED"), ("bad", "Failed", "FAILED")):
        out = seis(env, "launch", "pretrain", "--name", run)
        assert out.returncode == 0, out.stderr
        name = next(n for (_, n) in api.jobs if n.startswith(f"{run}-"))
        api.set_condition(name, "Running")
        api.set_condition(name, final)
        row = status(env, run)
        assert row["state"] == want and row["reason"] == f"job {final.lower()}"
        api.start_pods(name, nodes=1, per_node=8)
        follow = seis(env, "logs", run, "-f", "--rank", "3")  # streams the pod's log, then exits with the job
        assert follow.returncode == (0 if want == "COMPLETED" else 1), follow.stderr
        assert follow.stdout.splitlines() == [f"[default3]:step {s}/10 loss 0.{s} (node 0, rank 3)" for s in (1, 2)]


def test_submission_errors_are_the_servers_words(
    k8s: tuple[FakeApi, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from seiscli.launcher.backends.base import SubmitError
    from seiscli.launcher.backends.hyperpod_eks import HyperPodEksBackend
    from seiscli.launcher.launch import plan_launch, write_run
    from seiscli.launcher.profiles import load_recipe_for_cluster

    api, env = k8s
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = write_run(plan_launch(load_recipe_for_cluster("pretrain", {"name": "twice"}, None)))
    backend = HyperPodEksBackend()
    backend.submit(run)
    with pytest.raises(SubmitError, match=r'^409 AlreadyExists: hyperpodpytorchjobs "twice-.*" already exists$'):
        backend.submit(run)
    wrong = seis(env, "launch", "pretrain", "--set", "cluster.eks.context=other", "--name", "nowhere")
    assert wrong.returncode == 1 and "Kubernetes API not reached" in wrong.stdout
    missing = seis(env, "launch", "pretrain", "--set", "cluster.eks.context=nope", "--name", "nocontext")
    assert missing.returncode == 1 and "kubeconfig (context 'nope')" in missing.stdout
    assert [n for (_, n) in api.jobs] == [run.submission()["job_id"].split("/")[1]]


def test_doctor_checks_the_operator_api(k8s: tuple[FakeApi, dict[str, str]]) -> None:
    api, env = k8s
    # The volumes' S3 endpoint is a closed local port, and no credential lookup leaves the machine.
    offline = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_EC2_METADATA_DISABLED": "true"}
    out = seis(env | offline, "doctor", "pretrain", "--set", "data.endpoint_url=http://127.0.0.1:9", "--json")
    rows = {r["name"]: r for r in json.loads(out.stdout)["checks"]}
    assert rows["kubernetes"]["status"] == "pass", rows["kubernetes"]
    assert rows["image"]["status"] == "pass" and rows["shared_dir"]["status"] == "pass"
    assert ("GET", "/apis/sagemaker.amazonaws.com/v1/namespaces/team-a/hyperpodpytorchjobs?limit=1") in api.requests
    # No S3 answers there: the data check fails, and so the exit code is non-zero.
    assert out.returncode == 1 and rows["data"]["status"] == "fail", rows["data"]
