"""Regular expressions shared by the types, the generated CRD and validation: written once, here.

Why one module: the same string is a pydantic ``pattern`` (types), an OpenAPI ``pattern`` that the API server
enforces (CRD) and a compiled regex in a validation rule. Copies drift; a CRD pattern that is looser than the
validation rule lets ``kubectl apply`` accept what ``ftctl validate`` refuses. Each constant is the pattern
text (for pydantic and the CRD); the ``*_RE`` companions are compiled once for rules.
"""

from __future__ import annotations

import re

#: RFC 1123 label: object names that become Service names, label values, path segments.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: RFC 1123 subdomain: names of Secrets, PVCs, PriorityClasses, label-key prefixes.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: Dataset names become keys of dataset_info.json and LF's ``dataset`` list: no commas, no path separators.
DATASET_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
#: A Kubernetes resource.Quantity (apimachinery's regex, without sign: requests are never negative).
QUANTITY_PATTERN = r"^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|[KMGTPE]i|[numkMGTPE])?$"
#: One PEFT module name (or a glob LLaMA-Factory accepts), as in ``lora_target``.
LORA_MODULE_PATTERN = r"^[A-Za-z0-9_.*-]+$"
#: ``lora_target`` in its string form: ``all`` or comma-separated module names (the CRD types it as a string).
LORA_TARGET_PATTERN = r"^[A-Za-z0-9_.*-]+(,[A-Za-z0-9_.*-]+)*$"
#: A key of a Secret or ConfigMap (``validation.IsConfigMapKey``).
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
#: A label value (and the name part of a label key), at most 63 characters (checked separately).
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: A hub model id: ``name`` or ``owner/name``.
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$"
#: An environment variable name (the Pod API's C_IDENTIFIER-like rule, relaxed as kubelet allows).
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"

#: A container image reference, ``[registry[:port]/]path[:tag][@digest]`` (the distribution grammar, compact
#: enough for the CRD). No whitespace or newlines: the string reaches the kubelet and the allowlist unchanged.
IMAGE_PATTERN = (
    r"^[a-zA-Z0-9][a-zA-Z0-9.:-]*(/[a-z0-9][a-z0-9._-]*)*"
    r"(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(@[a-z0-9]+:[a-fA-F0-9]{32,})?$"
)
#: A model id clients send in OpenAI API requests (``"model": ...``): printable, no spaces or newlines.
SERVED_MODEL_NAME_PATTERN = r"^[A-Za-z0-9][-A-Za-z0-9._:/@+]*$"

DNS_LABEL_RE = re.compile(DNS_LABEL_PATTERN)
DNS_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
QUANTITY_RE = re.compile(QUANTITY_PATTERN)
LORA_MODULE_RE = re.compile(LORA_MODULE_PATTERN)
SECRET_KEY_RE = re.compile(SECRET_KEY_PATTERN)
LABEL_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)
HUB_ID_RE = re.compile(HUB_ID_PATTERN)


def is_quantity(value: str) -> bool:
    """Whether ``value`` is a non-negative Kubernetes quantity (``500m``, ``2``, ``64Gi``, ``1e3``)."""
    return bool(QUANTITY_RE.match(value))


def is_label_value(value: str) -> bool:
    """A valid label value: at most 63 characters, alphanumeric at both ends, ``-_.`` inside."""
    return len(value) <= 63 and bool(LABEL_VALUE_RE.match(value))


def is_dns_subdomain(value: str) -> bool:
    return 0 < len(value) <= 253 and bool(DNS_SUBDOMAIN_RE.match(value))


def is_label_key(key: str) -> bool:
    """An optional DNS-subdomain prefix and '/', then a name of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    if prefix and not is_dns_subdomain(prefix):
        return False
    return 0 < len(name) <= 63 and bool(LABEL_VALUE_RE.match(name))
