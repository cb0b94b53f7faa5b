"""`--emit k8s`: one node: a Deployment, its Service, the model-cache PVC (and, with --hpa N, a
HorizontalPodAutoscaler on the queue metric); several nodes: a LeaderWorkerSet whose leader runs `serve`
(rank 0 and HTTP) and whose workers run the other nodes' ranks, a Service on the leaders, the PVC.

Every pod runs the same `r1deploy serve` command: under LeaderWorkerSet serve reads LWS_LEADER_ADDRESS,
LWS_WORKER_INDEX and LWS_GROUP_SIZE (distributed/launcher_env.py), so worker pods know their node rank.
"""

from __future__ import annotations

from typing import Any

import yaml

from r1deploy.deploy.spec import MODEL_CACHE, DeployTarget, gib_ceil

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
# Requests waiting per pod above which the autoscaler adds a replica (r1deploy_num_requests_waiting).
HPA_QUEUE_TARGET = "4"
API_KEY_SECRET = "r1deploy-api-key"


def _container(t: DeployTarget, serves_http: bool) -> dict[str, Any]:
    memory = f"{gib_ceil(t.memory_limit_bytes)}Gi"
    env = [{"name": k, "value": v} for k, v in t.nccl_env().items()]
    env.append({"name": "R1DEPLOY_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": API_KEY_SECRET, "key": "api-key", "optional": True}}})
    container: dict[str, Any] = {
        "name": "serve",
        "image": t.image,
        "imagePullPolicy": "IfNotPresent",
        "command": t.serve_args(),
        "env": env,
        "resources": {
            "requests": {"cpu": str(t.cpu_cores), "memory": memory, "nvidia.com/gpu": t.gpus_per_node},
            "limits": {"memory": memory, "nvidia.com/gpu": t.gpus_per_node},
        },
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"},
                         {"name": "model-cache", "mountPath": MODEL_CACHE}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False},
    }
    if serves_http:
        container["ports"] = [{"name": "http", "containerPort": t.port}]
        # /health/live answers while the model loads; /health/ready only once it serves (and not while draining).
        container["readinessProbe"] = {"httpGet": {"path": "/health/ready", "port": "http"}, "periodSeconds": 10}
        container["livenessProbe"] = {"httpGet": {"path": "/health/live", "port": "http"}, "periodSeconds": 15,
                                      "failureThreshold": 4}
    return container


def _pod_spec(t: DeployTarget, serves_http: bool, spread_label: tuple[str, str]) -> dict[str, Any]:
    key, value = spread_label
    return {
        "containers": [_container(t, serves_http)],
        # serve drains in-flight requests on SIGTERM for --drain-timeout (30 s) before exiting
        "terminationGracePeriodSeconds": 45,
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{gib_ceil(t.shm_bytes)}Gi"}},
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": f"{t.name}-model-cache"}},
        ],
        # One pod per node: each pod takes all the GPUs the plan puts on a node.
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {key: value}}, "topologyKey": "kubernetes.io/hostname"}]}},
    }


def _pvc(t: DeployTarget, shared: bool) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{t.name}-model-cache"},
            "spec": {"accessModes": ["ReadWriteMany" if shared else "ReadWriteOnce"],
                     "resources": {"requests": {"storage": f"{gib_ceil(t.disk_bytes)}Gi"}}}}


def _service(t: DeployTarget, selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": t.name},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": t.port, "targetPort": "http"}]}}


def single_node(t: DeployTarget) -> list[dict[str, Any]]:
    labels = {"app": t.name}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": t.name, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": _pod_spec(t, True, ("app", t.name))}},
    }
    docs = [_pvc(t, shared=t.hpa_max_replicas > 1), deployment, _service(t, labels)]
    if t.hpa_max_replicas:
        docs.append({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": t.name},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": t.name},
                     "minReplicas": 1, "maxReplicas": t.hpa_max_replicas,
                     # a per-pod custom metric: needs a metrics adapter serving it from Prometheus
                     "metrics": [{"type": "Pods", "pods": {
                         "metric": {"name": "r1deploy_num_requests_waiting"},
                         "target": {"type": "AverageValue", "averageValue": HPA_QUEUE_TARGET}}}]},
        })
    return docs


def leader_worker_set(t: DeployTarget) -> dict[str, Any]:
    spread = (LWS_NAME_LABEL, t.name)
    return {
        "apiVersion": LWS_API, "kind": "LeaderWorkerSet", "metadata": {"name": t.name},
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": t.nodes,
                # a failed pod restarts the whole group: the tensor-parallel ranks cannot rejoin one by one
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": {"role": "leader"}},
                                   "spec": _pod_spec(t, True, spread)},
                "workerTemplate": {"metadata": {"labels": {"role": "worker"}},
                                   "spec": _pod_spec(t, False, spread)},
            },
        },
    }


def manifests(t: DeployTarget) -> list[dict[str, Any]]:
    if not t.multi_node:
        return single_node(t)
    return [_pvc(t, shared=True), leader_worker_set(t),
            _service(t, {LWS_NAME_LABEL: t.name, LWS_INDEX_LABEL: "0"})]


def emit(t: DeployTarget) -> dict[str, str]:
    header = (f"# r1deploy serve for {t.model} on {t.nodes} node(s) x {t.gpus_per_node} GPU(s), written by "
              "`r1deploy plan --emit k8s`: kubectl apply -f k8s.yaml"
              + (" (needs the LeaderWorkerSet controller: github.com/kubernetes-sigs/lws)" if t.multi_node else "")
              + "\n")
    return {"k8s.yaml": header + yaml.safe_dump_all(manifests(t), sort_keys=False)}
