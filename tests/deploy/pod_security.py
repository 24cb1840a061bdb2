"""Kubernetes Pod Security Standards, "restricted" profile (v1.32), as checks on a rendered pod spec.

The admission controller (namespace label pod-security.kubernetes.io/enforce: restricted) refuses pods that
fail these; checking the rendered YAML finds them before a cluster does. Restricted includes baseline.
"""

from __future__ import annotations

RESTRICTED_VOLUME_KINDS = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}  # fmt: skip
ALLOWED_ADDED_CAPABILITIES = {"NET_BIND_SERVICE"}
HOST_NAMESPACES = ("hostNetwork", "hostPID", "hostIPC")


def restricted_violations(pod: dict) -> list[str]:
    """Why `pod` (a PodSpec) fails Pod Security "restricted", one line per failure; empty if it passes."""
    problems = [f"pod sets {key}" for key in HOST_NAMESPACES if pod.get(key)]
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_KINDS:
            problems.append(f"volume {volume['name']} is {sorted(kinds)}")
    pod_context = pod.get("securityContext", {})
    containers = pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])
    for container in containers:
        name, context = container["name"], container.get("securityContext", {})
        effective = lambda key: context.get(key, pod_context.get(key))  # noqa: E731 - container overrides pod
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if effective("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if effective("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp!r}, not RuntimeDefault or Localhost")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - ALLOWED_ADDED_CAPABILITIES:
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {context['procMount']}")
    return problems
