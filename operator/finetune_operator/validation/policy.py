"""Install-level policy: what the *operator's installer* allows, which the spec alone cannot say.

A FineTuneJob must grant its author nothing they lack. Two of its fields could: the images its pods run and
``trust_remote_code`` (the model folder's Python code runs in the pod). The operator validates every spec with
the :class:`Policy` of its install (``FT_ALLOWED_IMAGES``, ``FT_ALLOWED_IMAGE_PREFIXES``,
``FT_ALLOW_TRUST_REMOTE_CODE``; the Helm chart sets them), so the policy holds even without the chart's
ValidatingAdmissionPolicy. ``ftctl validate``/``render`` use :data:`OFFLINE` unless told otherwise: any image
(an offline tool cannot know the cluster's list) and no ``trust_remote_code`` (the operator's default).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OFFLINE", "Policy"]


@dataclass(frozen=True)
class Policy:
    allowed_images: frozenset[str] | None = None
    """Images pods may run, exactly; None: any image."""
    allowed_image_prefixes: tuple[str, ...] = ()
    """Prefixes (``registry.example.com/ml/``) of further allowed images."""
    allow_trust_remote_code: bool = False
    """Whether ``trust_remote_code`` (training args) and ``--trust-remote-code`` (vLLM) may be set."""

    def image_allowed(self, image: str) -> bool:
        if self.allowed_images is None:
            return True
        return image in self.allowed_images or any(image.startswith(p) for p in self.allowed_image_prefixes if p)

    def describe_images(self) -> str:
        """The allowlist in words, for error messages."""
        if self.allowed_images is None:
            return "any image"
        parts = sorted(self.allowed_images) + [f"{p}*" for p in self.allowed_image_prefixes if p]
        return ", ".join(parts) or "no image"


#: ``ftctl``'s default: any image, no trust_remote_code.
OFFLINE = Policy()
