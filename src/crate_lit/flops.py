"""The FLOPs of a training step and model FLOPs utilisation (MFU), shared by crate-train's
``ThroughputLogger`` and crate-bench.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix products and
convolutions, two FLOPs per multiply-add; element-wise work (norms, softmax, the loss) is not
counted. MFU is the counted FLOPs of the images trained per second on one device over that
device's peak FLOP/s for the precision the matrix products run in.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak TFLOP/s of one GPU for its matrix products in 16-bit (bf16 / fp16),
# TF32 and fp32, by torch.cuda.get_device_name(); from NVIDIA's data sheets. The H100 PCIe and
# NVL and the H200 NVL have lower peaks and are not listed: give callbacks.throughput.peak_tflops
# (crate-bench --peak-tflops) for those and any other device.
PEAK_TFLOPS: Dict[str, Tuple[float, float, float]] = {
    "NVIDIA H100 80GB HBM3": (989.0, 494.5, 67.0),  # H100 SXM
    "NVIDIA H200": (989.0, 494.5, 67.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0, 19.5),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0, 19.5),
    "NVIDIA A100 80GB PCIe": (312.0, 156.0, 19.5),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0, 19.5),
}
MATMUL_FORMATS = ("16-bit", "TF32", "fp32")


def training_loss(
    model: Callable[..., Any],
    images: Tensor,
    labels: Optional[Tensor] = None,
    *,
    mask_ratio: float = 0.75,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The loss a training step back-propagates: with ``labels``, a classifier's cross-entropy on
    the logits ``model(images)``; without, a CRATE-MAE's own loss at ``mask_ratio`` (the first
    output of its forward)."""
    if labels is None:
        return model(images, mask_ratio=mask_ratio)[0]
    return F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)


def training_flops(
    model: nn.Module, images: Tensor, labels: Optional[Tensor] = None, *, mask_ratio: float = 0.75
) -> int:
    """The FLOPs of the forward and backward of one training step (:func:`training_loss`) of
    ``model`` on a batch shaped as ``images`` and ``labels`` (none: a CRATE-MAE's pre-training).

    Counted on the meta device: the parameters, buffers and batch are replaced by meta tensors of
    their shapes and dtypes (``torch.func.functional_call``), so nothing is computed or allocated
    and the model's weights, gradients, BatchNorm statistics and random generators stay as they
    were. The backward computes what training computes: the gradients of the parameters that
    require them. Attention counts as its matrix products (2 forward, 4 backward): model FLOPs,
    whichever kernel training runs (fused kernels recompute the scores in their backward; that
    recomputation is not counted). A model compiled in place (``model.compile()``) runs eagerly
    for the count. For the whole batch: CRATE's ISTA step matrix is one product per step, so
    FLOPs per image depend (slightly) on the batch size."""
    state = {
        name: torch.empty_like(tensor, device="meta").requires_grad_(tensor.requires_grad)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    batch = torch.empty_like(images, device="meta")
    targets = None if labels is None else torch.empty_like(labels, device="meta")
    trainable = [tensor for tensor in state.values() if tensor.requires_grad]

    def call(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, state, args, kwargs)

    with (
        torch.enable_grad(),  # a caller under no_grad would count the forward alone
        torch.compiler.set_stance("force_eager"),  # no compilation for shapes training never sees
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as counter,
    ):
        loss = training_loss(call, batch, targets, mask_ratio=mask_ratio)
        if trainable:
            # gradients as new tensors: no .grad of any parameter is touched
            torch.autograd.grad(loss, trainable, allow_unused=True)
    return counter.get_total_flops()


def matmul_format(precision: str) -> Optional[str]:
    """The format of the matrix products of a run at ``precision`` (Lightning's ``trainer.precision``,
    or crate-bench's fp32 / bf16 / fp16): one of :data:`MATMUL_FORMATS`, float32 being TF32 where
    ``torch.get_float32_matmul_precision()`` is not "highest"; None for any other (64-bit)."""
    if "16" in precision:
        return "16-bit"
    if "32" in precision:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "TF32"
    return None


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """The peak TFLOP/s of ``device`` for the matrix products of ``precision`` from
    :data:`PEAK_TFLOPS`; None for a CPU, a GPU not in the table, or a precision with no rate."""
    if device.type != "cuda":
        return None
    rates = PEAK_TFLOPS.get(torch.cuda.get_device_name(device))
    kind = matmul_format(precision)
    if rates is None or kind is None:
        return None
    return rates[MATMUL_FORMATS.index(kind)]


def device_description(device: torch.device) -> str:
    """How a message names ``device``: the GPU's own name, or its type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"the {device.type.upper()}"


def mfu(images_per_sec: float, flops_per_image: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of one device: the FLOP/s its training images take over its peak."""
    return images_per_sec * flops_per_image / (peak_tflops * 1e12)


def check_peak_tflops(value: Any, key: str = "callbacks.throughput.peak_tflops") -> None:
    """Raise ValueError unless ``value`` is null or a positive number (TFLOP/s)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"{key} must be null or the peak TFLOP/s of one device, a positive number (e.g. 989 for an "
            f"H100 SXM in bf16), got {value!r}"
        )
