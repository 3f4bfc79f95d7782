"""Every API permission the operator and its workers use: the one definition of the RBAC rules.

The chart's rule templates (``charts/finetune-operator/templates/_rbac_rules.tpl``) are generated from this
module (``python -m finetune_operator.controller.rbac``; scripts/render-install.sh runs it before rendering
``manifests/install.yaml``), and tests/test_chart.py fails when the committed file is stale. The tests' API
server enforces what the installed chart grants: a request outside these rules is answered 403 Forbidden, so a
missing permission fails the operator tests instead of a cluster.

Least privilege: no wildcards, no Secrets (tokens reach pods only as ``secretKeyRef``), pods read-only (the
evaluation and publish results are in their pods' termination messages). Each rule carries the reason it
exists; the reason becomes a comment in the chart.

* :data:`NAMESPACED_RULES`: the operator, on namespaced objects (a ClusterRole in all-namespaces mode, a Role
  per watched namespace otherwise). The training workloads come from the backend registry.
* :data:`CLUSTER_RULES`: cluster-scoped reads kopf needs in both modes.
* :data:`NAMESPACE_WATCH_RULES`: with ``watchNamespaces``, kopf follows the listed namespaces.
* :data:`WORKER_IDENTITY_RULES`: the operator creates each FineTuneJob's worker identity (a ServiceAccount, a
  Role and a RoleBinding, see :mod:`finetune_operator.render.identity`); left out of the chart with the opt-in
  shared worker account (``worker.create: true``).
* :data:`WORKER_RULES`: what the rank-0 training pod may do: the per-job Role carries it with ``resourceNames``
  set to its FineTuneJob; the opt-in shared ``finetune-worker`` Role carries it for the whole namespace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from finetune_operator import backends
from finetune_operator.api import constants as c
from finetune_operator.backends.base import Rule

NAMESPACED_RULES: Final[tuple[Rule, ...]] = (
    Rule(
        (c.GROUP,),
        (c.PLURAL,),
        ("get", "list", "watch", "patch"),
        "FineTuneJobs: kopf lists and watches them; the reconciler reads one, and records the accepted spec in "
        "an annotation (patch) before creating the first child.",
    ),
    Rule((c.GROUP,), (f"{c.PLURAL}/status",), ("patch",), "Status: state, conditions, stages, outputs."),
    *(rule for b in backends.REGISTRY.values() for rule in b.rules()),
    Rule(
        ("apps",),
        ("deployments",),
        ("get", "list", "watch", "create", "patch", "delete"),
        "The vLLM Deployment: watched for availability, patched to scale and to roll to a new run's model, "
        "deleted when a new run (spec.runId) no longer serves.",
    ),
    Rule(
        ("",),
        ("configmaps",),
        ("get", "create"),
        "Generated LLaMA-Factory configs: created once (create-or-get); their content is a function of the "
        "accepted spec, so they are never patched.",
    ),
    Rule(
        ("",),
        ("services",),
        ("get", "create", "delete"),
        "Headless Services of multi-node Indexed Jobs and the vLLM Service: created once; the vLLM Service is "
        "deleted with its Deployment when a new run no longer serves.",
    ),
    Rule(
        ("",),
        ("services/proxy",),
        ("create",),
        "The answer check: after each rollout one chat completion is POSTed to the vLLM Service through the API "
        "server's Service proxy (a POST is authorised as create on services/proxy) before Ready turns true. "
        "POST only (create); the operator sends nothing else through the proxy.",
    ),
    Rule(
        ("",), ("events",), ("create",), "Events about FineTuneJobs (stage started/succeeded/retrying, serving, ...)."
    ),
    Rule(
        ("",),
        ("pods",),
        ("list",),
        "Read-only: the evaluation and publish results (metrics for the promotion gate, where copies went) are in "
        "the termination message of their Job's pod, listed by the Job's label; only that container writes it, "
        "unlike status, which worker pods may patch. Never create, patch or delete.",
    ),
)

CLUSTER_RULES: Final[tuple[Rule, ...]] = (
    Rule(
        ("apiextensions.k8s.io",),
        ("customresourcedefinitions",),
        ("list", "watch"),
        "kopf watches CustomResourceDefinitions to notice when a watched resource appears or disappears.",
    ),
)

NAMESPACE_WATCH_RULES: Final[tuple[Rule, ...]] = (
    Rule(
        ("",),
        ("namespaces",),
        ("list", "watch"),
        "With a namespace list kopf lists and watches Namespaces to follow the ones that match (without it kopf "
        "falls back to the listed names, with a warning).",
    ),
)

WORKER_IDENTITY_RULES: Final[tuple[Rule, ...]] = (
    Rule(
        ("",),
        ("serviceaccounts",),
        ("get", "create"),
        "Each FineTuneJob's worker ServiceAccount (<job>-worker), created once with its first step (create-or-get).",
    ),
    Rule(
        ("rbac.authorization.k8s.io",),
        ("roles", "rolebindings"),
        ("get", "create"),
        "Each FineTuneJob's worker Role (patch on that one FineTuneJob's status, resourceNames) and its binding. "
        "The API server allows this only because the operator holds that permission itself (RBAC escalation "
        "check): it can grant no more than it has.",
    ),
)

WORKER_RULES: Final[tuple[Rule, ...]] = (
    Rule(
        (c.GROUP,),
        (f"{c.PLURAL}/status",),
        ("patch",),
        "The only write a worker may make: a JSON merge patch of status.reported.<stage> (progress).",
    ),
)

#: Every operator rule, as (apiGroup, resources, verbs) triples.
RULES: Final[tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = tuple(
    (g, r.resources, r.verbs)
    for r in (*NAMESPACED_RULES, *WORKER_IDENTITY_RULES, *CLUSTER_RULES, *NAMESPACE_WATCH_RULES)
    for g in r.api_groups
)

#: The generated chart file, relative to the repository root.
CHART_FILE: Final = Path("charts/finetune-operator/templates/_rbac_rules.tpl")

#: Helm ``define`` name -> rules.
TEMPLATES: Final[dict[str, tuple[Rule, ...]]] = {
    "finetune-operator.namespacedRules": NAMESPACED_RULES,
    "finetune-operator.workerIdentityRules": WORKER_IDENTITY_RULES,
    "finetune-operator.clusterRules": CLUSTER_RULES,
    "finetune-operator.namespaceWatchRules": NAMESPACE_WATCH_RULES,
    "finetune-operator.workerRules": WORKER_RULES,
}


def allows(group: str, resource: str, verb: str) -> bool:
    """Whether ``RULES`` grant ``verb`` on ``group``/``resource`` (``resource`` may be ``plural/subresource``)."""
    return any(group == g and resource in rs and verb in vs for g, rs, vs in RULES)


def cluster_role(name: str = "finetune-operator") -> dict[str, Any]:
    """A ClusterRole with every operator rule (the all-namespaces install)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [r.to_k8s() for r in (*NAMESPACED_RULES, *WORKER_IDENTITY_RULES, *CLUSTER_RULES)],
    }


def _yaml_rule(rule: Rule) -> list[str]:
    # JSON lists are YAML flow sequences with every string quoted: nothing a YAML reader could retype.
    lines = [f"# {line}" for line in _wrap(rule.reason)]
    lines.append(f"- apiGroups: {json.dumps(list(rule.api_groups))}")
    lines.append(f"  resources: {json.dumps(list(rule.resources))}")
    lines.append(f"  verbs: {json.dumps(list(rule.verbs))}")
    if rule.resource_names:
        lines.append(f"  resourceNames: {json.dumps(list(rule.resource_names))}")
    return lines


def _wrap(text: str, width: int = 100) -> list[str]:
    out: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*out, line] if line else out


def chart_template() -> str:
    """The text of :data:`CHART_FILE`: one Helm ``define`` per rule set."""
    parts = [
        "{{/*",
        "Generated by `python -m finetune_operator.controller.rbac` from",
        "operator/finetune_operator/controller/rbac.py, the one definition of the RBAC rules (the backends' rules",
        "come from the backend registry). Do not edit: tests/test_chart.py fails when this file is stale. The",
        "tests' API server enforces these rules.",
        "*/}}",
    ]
    for name, rules in TEMPLATES.items():
        parts.append(f'{{{{- define "{name}" -}}}}')
        for rule in rules:
            parts.extend(_yaml_rule(rule))
        parts.append("{{- end -}}")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) the chart's generated rule templates under ``--root``."""
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.controller.rbac", description=__doc__)
    parser.add_argument("--root", default=".", help="repository root (default: the current directory)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file is stale")
    args = parser.parse_args(argv)
    path = Path(args.root) / CHART_FILE
    text = chart_template()
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is stale: run python -m finetune_operator.controller.rbac", file=sys.stderr)
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
