"""SageMaker HyperPod on EKS: a HyperPodPyTorchJob per run, through the Kubernetes API.

The launcher renders `job.yaml` from templates/hyperpod-eks.yaml.j2 and creates it with the `kubernetes` client
(`pip install 'seis[eks]'`, imported lazily: login nodes on Slurm never need it). The client reads the usual
kubeconfig ($KUBECONFIG or ~/.kube/config, `aws eks update-kubeconfig` writes it) and the recipe's
cluster.eks.context. Pods read the recipe from, and write metrics, logs and checkpoints to, the run directory
on the shared filesystem (cluster.shared_dir, a PersistentVolumeClaim in the pods), so `seis launch` must write
the run under that path (--runs-dir or $SEIS_RUNS_DIR).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import yaml

from seiscli.launcher.backends.base import JobState, JobStatus, SubmitError
from seiscli.launcher.runs import Run
from seiscli.recipe import Recipe, RecipeError

GROUP, VERSION, PLURAL, KIND = "sagemaker.amazonaws.com", "v1", "hyperpodpytorchjobs", "HyperPodPyTorchJob"
MANIFEST_NAME = "job.yaml"
JOB_LABEL = "seis/job"

# libfabric/NCCL over EFA inside the pods; the image brings aws-ofi-nccl (see templates/hyperpod-slurm.sh.j2 for
# the sources). In a pod only lo and eth0 exist besides EFA, so NCCL's bootstrap just avoids lo, as in
# awsome-distributed-training 3.test_cases/pytorch/FSDP/kubernetes/llama3_1_8b-fsdp-hpto.yaml.
EFA_ENV = {
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",
    "FI_EFA_USE_HUGE_PAGE": "0",
    "FI_EFA_FORK_SAFE": "1",
    "NCCL_SOCKET_IFNAME": "^lo",
}
RESILIENCE_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_FR_BUFFER_SIZE": "20000",  # TORCH_NCCL_TRACE_BUFFER_SIZE before PyTorch 2.7
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}

# The operator's condition types (the last one that is True is the job's state, as `hyp list` reads them).
_CONDITION_STATE = {
    "Created": JobState.PENDING,
    "Pending": JobState.PENDING,
    "Suspended": JobState.PENDING,
    "Running": JobState.RUNNING,
    "PodsRunning": JobState.RUNNING,
    "Restarting": JobState.REQUEUED,
    "Succeeded": JobState.COMPLETED,
    "Completed": JobState.COMPLETED,
    "Failed": JobState.FAILED,
}


# -- rendering -------------------------------------------------------------------------------------------


def job_name(recipe_name: str, run_dir: Path) -> str:
    """A DNS-1123 label of at most 52 characters (pods append `-pods-<i>` and must stay within 63)."""
    slug = re.sub(r"[^a-z0-9]+", "-", recipe_name.lower()).strip("-")
    stamp = re.sub(r"[^0-9-]+", "", run_dir.name).strip("-")
    name = f"{slug[: 51 - len(stamp)].rstrip('-')}-{stamp}" if stamp else slug[:52]
    return name.strip("-") or "seis-job"


def manifest_context(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """What templates/hyperpod-eks.yaml.j2 needs beyond the recipe; refuses jobs whose pods could not start."""
    c = recipe.cluster
    if not c.container_image:
        raise RecipeError("field 'cluster.container_image': a hyperpod-eks job runs in an image; set one")
    if not c.shared_dir or not c.eks.shared_pvc:
        raise RecipeError(
            "fields 'cluster.shared_dir' and 'cluster.eks.shared_pvc': a hyperpod-eks job reads its recipe from and "
            "writes its run directory to the shared filesystem; set both (e.g. /fsx and its PersistentVolumeClaim)"
        )
    if not PurePosixPath(run_dir).is_relative_to(PurePosixPath(c.shared_dir)):
        raise RecipeError(
            f"run directory {str(run_dir)!r} is outside cluster.shared_dir {c.shared_dir!r}, which is all the pods "
            f"see; put the runs there: --runs-dir {c.shared_dir}/seis/runs (or $SEIS_RUNS_DIR)"
        )
    network = (EFA_ENV if c.efa_per_node else {}) | RESILIENCE_ENV
    network = network | {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{run_dir}/logs/nccl-trace-rank-"}
    return {
        "job_name": job_name(recipe.name, run_dir),
        "network_env": {k: v for k, v in network.items() if k not in c.env},
    }


# -- the Kubernetes API ----------------------------------------------------------------------------------


def _kube(context: str | None) -> Any:
    try:
        from kubernetes import client, config
    except ImportError:
        raise SubmitError("the hyperpod-eks backend needs the kubernetes client: pip install 'seis[eks]'") from None
    try:
        api = config.new_client_from_config(context=context)
    except Exception as e:  # ConfigException, missing file, bad context: all one line for the user
        where = f"context {context!r}" if context else "the current context"
        raise SubmitError(f"kubeconfig ({where}): {e}") from None
    return client, api


def _api_error(e: Any) -> str:
    """The API server's own message from an ApiException (its body is a Status object)."""
    try:
        import json

        body = json.loads(e.body)
        return f"{e.status} {body.get('reason', e.reason)}: {body.get('message', '')}".strip()
    except (TypeError, ValueError, AttributeError):
        return f"{getattr(e, 'status', '?')} {getattr(e, 'reason', e)}"


def _job_ref(run: Run) -> tuple[str, str, str | None]:
    sub = run.submission()
    ns, _, name = str(sub.get("job_id", "")).partition("/")
    return ns, name, sub.get("kube_context")


def state_of(obj: dict[str, Any]) -> JobStatus:
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    true = [c for c in conditions if str(c.get("status")) == "True"]
    last = true[-1] if true else None
    state = _CONDITION_STATE.get(last["type"], JobState.UNKNOWN) if last else JobState.PENDING
    start = _rfc3339(status.get("startTime"))
    end = _rfc3339(status.get("completionTime"))
    elapsed = (end or time.time()) - start if start else None
    return JobStatus(
        state=state,
        reason=(last.get("message") or last.get("reason")) if last else None,
        source="kubernetes",
        restarts=int(status.get("restartCount") or 0),
        start_time=start,
        end_time=end,
        elapsed_s=elapsed,
        raw_state=last["type"] if last else "",
    )


def _rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class HyperPodEksBackend:
    name = "hyperpod-eks"

    def submit(self, run: Run) -> str:
        manifest = yaml.safe_load((run.path / MANIFEST_NAME).read_text())
        meta = manifest["metadata"]
        context = Recipe.model_validate(yaml.safe_load(run.recipe_path.read_text())).cluster.eks.context
        client, api = _kube(context)
        try:
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURAL, manifest
            )
        except client.ApiException as e:
            raise SubmitError(_api_error(e)) from None
        except Exception as e:  # connection refused, TLS, DNS: the API server was not reached
            raise SubmitError(f"Kubernetes API not reached: {e}") from None
        job_id = f"{meta['namespace']}/{meta['name']}"
        run.update_submission(
            backend=self.name, job_id=job_id, kube_context=context, submitted=time.time(), state="PENDING"
        )
        return job_id

    def _get(self, run: Run) -> dict[str, Any] | None:
        ns, name, context = _job_ref(run)
        client, api = _kube(context)
        try:
            return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise RuntimeError(_api_error(e)) from None

    def status(self, run: Run) -> JobStatus:
        try:
            obj = self._get(run)
        except (RuntimeError, SubmitError) as e:
            return JobStatus(state=JobState.UNKNOWN, reason=str(e), source="kubernetes")
        if obj is None:
            return JobStatus(state=JobState.UNKNOWN, reason="the job no longer exists", source="kubernetes")
        st = state_of(obj)
        try:
            pods = self._pods(run)
        except RuntimeError:
            pods = []  # the job's state is known; where its pods run is a detail
        st.nodes = [p["spec"]["nodeName"] for p in pods if p.get("spec", {}).get("nodeName")]
        st.node_count = len(st.nodes) or None
        return st

    def cancel(self, run: Run) -> None:
        ns, name, context = _job_ref(run)
        client, api = _kube(context)
        try:
            client.CustomObjectsApi(api).delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground"
            )
        except client.ApiException as e:
            if e.status != 404:
                raise RuntimeError(_api_error(e)) from None
        run.update_submission(state=JobState.CANCELLED.value, finished=time.time())

    # -- logs ------------------------------------------------------------------------------------------

    def _pods(self, run: Run) -> list[dict[str, Any]]:
        ns, name, context = _job_ref(run)
        client, api = _kube(context)
        try:
            pods = client.CoreV1Api(api).list_namespaced_pod(ns, label_selector=f"{JOB_LABEL}={name}")
        except client.ApiException as e:
            raise RuntimeError(_api_error(e)) from None
        items = [api.sanitize_for_serialization(p) for p in pods.items]
        return sorted(items, key=lambda p: p["metadata"]["name"])

    def pod_logs(self, run: Run) -> list[tuple[str, str | None, str]]:
        """(pod name, node, whole log) of every pod of the job, in pod order (`seis logs --errors/--grep`)."""
        ns, _, context = _job_ref(run)
        client, api = _kube(context)
        core = client.CoreV1Api(api)
        found = []
        for pod in self._pods(run):
            name = pod["metadata"]["name"]
            try:
                resp = core.read_namespaced_pod_log(name, ns, _preload_content=False)
            except client.ApiException as e:
                raise RuntimeError(f"logs of pod {name}: {_api_error(e)}") from None
            found.append((name, pod.get("spec", {}).get("nodeName"), resp.data.decode(errors="replace")))
        return found

    def show_logs(
        self,
        run: Run,
        *,
        follow: bool = False,
        rank: int | None = None,
        node: str | None = None,
        tail: int | None = None,
        out: TextIO | None = None,
    ) -> int:
        """Print pod logs: rank 0's pod (or the pod of --rank/--node); rank lines carry torchrun's `[defaultK]:`
        prefix, so --rank keeps that rank's lines only. With follow, stream until the pod's log ends."""
        out = out or sys.stdout
        ns, _, context = _job_ref(run)
        client, api = _kube(context)
        pods = self._pods(run)
        if not pods:
            out.write(f"seis: no pods yet for {run.id}\n")
            return 0
        per_node = Recipe.model_validate(yaml.safe_load(run.recipe_path.read_text())).cluster.procs_per_node
        if node is not None:
            chosen = [p for p in pods if p.get("spec", {}).get("nodeName") == node]
            if not chosen:
                ran_on = ", ".join(p.get("spec", {}).get("nodeName") or "-" for p in pods)
                raise RuntimeError(f"--node {node}: the pods of {run.id} run on {ran_on}")
        else:
            index = (rank or 0) // per_node
            if index >= len(pods):
                raise RuntimeError(f"--rank {rank}: {run.id} has {len(pods) * per_node} ranks")
            chosen = [pods[index]]
        prefix = f"[default{rank % per_node}]:" if rank is not None else None
        core = client.CoreV1Api(api)
        for pod in chosen:
            pod_name = pod["metadata"]["name"]
            kwargs: dict[str, Any] = {"tail_lines": tail} if tail is not None else {}
            try:
                if follow:
                    resp = core.read_namespaced_pod_log(pod_name, ns, follow=True, _preload_content=False, **kwargs)
                    partial = ""
                    for raw in resp.stream():
                        text = partial + raw.decode(errors="replace")
                        cut = text.rfind("\n") + 1  # whole lines only: --rank filters by line
                        _write_lines(out, text[:cut], prefix)
                        partial = text[cut:]
                    _write_lines(out, partial, prefix)
                    resp.release_conn()
                else:
                    # Raw bytes: with preloading, this client version hands back str(bytes), "b'...'".
                    resp = core.read_namespaced_pod_log(pod_name, ns, _preload_content=False, **kwargs)
                    _write_lines(out, resp.data.decode(errors="replace"), prefix)
            except client.ApiException as e:
                raise RuntimeError(f"logs of pod {pod_name}: {_api_error(e)}") from None
        if not follow:
            return 0
        st = self.status(run)
        return 0 if st.state == JobState.COMPLETED else 1


def _write_lines(out: TextIO, text: str, prefix: str | None) -> None:
    if prefix is None:
        out.write(text)
    else:
        out.writelines(line for line in text.splitlines(keepends=True) if line.startswith(prefix))
    out.flush()
