"""Common data-centre GPUs: memory and dense 16-bit tensor throughput.

Kubernetes nodes carry the GPU model in the ``nvidia.com/gpu.product`` label (NVIDIA GPU Feature Discovery
writes e.g. ``NVIDIA-A100-SXM4-80GB`` or ``NVIDIA-H100-80GB-HBM3``). :func:`lookup` matches such a label (or a
short name like ``a100-80gb`` or ``H100``) against this table, most specific entry first. Memory is what
``nvidia-smi`` reports as total, in GiB; throughput is the vendor's dense (no sparsity) BF16/FP16 tensor-core
peak from the data sheets, used only for the duration estimate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: GPU memory framework/driver code cannot use for tensors: the CUDA context and cuBLAS/NCCL workspaces.
#: (PyTorch's CUDA context alone is 300-600 MiB depending on the GPU and CUDA version.)


@dataclass(frozen=True)
class Gpu:
    """One GPU model."""

    name: str
    memory_gib: float
    tflops: float
    """Dense BF16 (FP16 where there is no BF16) tensor-core peak, TFLOP/s."""


#: (pattern on the normalised product name, GPU); the first match wins, so specific entries come first.
GPUS: tuple[tuple[str, Gpu], ...] = (
    (r"H200", Gpu("NVIDIA H200 141GB", 140.4, 989.0)),
    (r"H100.*(PCIE|NVL)", Gpu("NVIDIA H100 PCIe 80GB", 79.6, 756.0)),
    (r"H100", Gpu("NVIDIA H100 SXM 80GB", 79.6, 989.0)),
    (r"GH200", Gpu("NVIDIA GH200 96GB", 95.0, 989.0)),
    (r"B200", Gpu("NVIDIA B200 180GB", 179.0, 2250.0)),
    (r"A100.*80", Gpu("NVIDIA A100 80GB", 80.0, 312.0)),
    (r"A100", Gpu("NVIDIA A100 40GB", 40.0, 312.0)),
    (r"A800.*80", Gpu("NVIDIA A800 80GB", 80.0, 312.0)),
    (r"H800", Gpu("NVIDIA H800 80GB", 79.6, 989.0)),
    (r"H20\b|H20$", Gpu("NVIDIA H20 96GB", 95.0, 148.0)),
    (r"L40S", Gpu("NVIDIA L40S 48GB", 44.5, 362.0)),
    (r"L40", Gpu("NVIDIA L40 48GB", 44.5, 181.0)),
    (r"L4\b|L4$", Gpu("NVIDIA L4 24GB", 22.5, 121.0)),
    (r"A10G", Gpu("NVIDIA A10G 24GB", 22.5, 70.0)),
    (r"A10\b|A10$", Gpu("NVIDIA A10 24GB", 22.5, 125.0)),
    (r"A6000", Gpu("NVIDIA RTX A6000 48GB", 47.5, 155.0)),
    (r"4090", Gpu("NVIDIA GeForce RTX 4090 24GB", 23.6, 165.0)),
    (r"3090", Gpu("NVIDIA GeForce RTX 3090 24GB", 23.7, 71.0)),
    (r"V100.*32", Gpu("NVIDIA V100 32GB", 31.7, 125.0)),
    (r"V100", Gpu("NVIDIA V100 16GB", 15.8, 125.0)),
    (r"T4\b|T4$", Gpu("NVIDIA T4 16GB", 14.6, 65.0)),
)

#: The node-selector label that names the GPU model.
PRODUCT_LABEL = "nvidia.com/gpu.product"


def _normalise(product: str) -> str:
    text = product.upper().replace("_", "-").replace(" ", "-")
    return re.sub(r"^(NVIDIA-|TESLA-)+", "", text)


def lookup(product: str) -> Gpu | None:
    """The table entry for a product label or short name; None when it is not a GPU we know."""
    text = _normalise(product)
    for pattern, gpu in GPUS:
        if re.search(pattern, text):
            return gpu
    return None


def known_products() -> list[str]:
    """Names of the table's GPUs (for error messages)."""
    return [gpu.name for _, gpu in GPUS]
