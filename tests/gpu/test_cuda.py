"""The same model on a CUDA GPU computes what it computes on the CPU.

Skipped where no GPU is visible (CI has none); `benchmarks/gpu_suite.sh` runs them on a GPU
machine. Every test takes its device as an argument, so the logic itself can be exercised on
the CPU: `python -c "from tests.gpu import test_cuda as t; t.test_...('cpu')"`.
"""

from __future__ import annotations

import pytest
import torch

from megatron.core.fusions.linear_cross_entropy import linear_cross_entropy
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ProcessGroups
from megatron.core.transformer.moe import experts as experts_mod
from megatron.core.transformer.moe.experts import GroupedExperts, per_expert_loop
from tests.helpers import make_config, rel_diff, train_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 comparisons need fp32 matmuls, not TF32."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def test_grouped_mm_fast_path_is_used_in_bf16(device=DEVICE):
    """On Hopper and later, bf16 experts must run on the grouped_mm kernel, not the fallback."""
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("grouped_mm's CUDA kernel needs compute capability 9.0")
    assert experts_mod._grouped_mm_works(torch.device(device).type, torch.bfloat16)


def test_bf16_grouped_experts_match_fp32_loop_on_cpu(device=DEVICE):
    cfg = make_config("--hidden-size 256 --moe-ffn-hidden-size 512 --num-attention-heads 8")
    torch.manual_seed(0)
    ref = GroupedExperts(cfg.model, 4)
    counts_E = torch.tensor([200, 0, 312, 8])  # an empty expert and a small one
    x = torch.randn(int(counts_E.sum()), 256)
    g = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    y_ref = per_expert_loop(ref, x_ref, counts_E)
    y_ref.backward(g)

    dev = GroupedExperts(cfg.model, 4).to(device)
    dev.load_state_dict(ref.state_dict())
    dev.bfloat16()  # as --bf16 runs it: bf16 weights and activations
    x_dev = x.to(device, torch.bfloat16).requires_grad_()
    y_dev = dev(x_dev, counts_E.to(device))
    y_dev.float().backward(g.to(device))
    assert rel_diff(y_dev.detach().float().cpu(), y_ref.detach()) < 1e-2
    assert rel_diff(x_dev.grad.float().cpu(), x_ref.grad) < 1e-2
    for p_dev, p_ref in zip(dev.parameters(), ref.parameters()):
        assert rel_diff(p_dev.grad.float().cpu(), p_ref.grad) < 1e-2


def test_fused_cross_entropy_matches_reference(device=DEVICE):
    torch.manual_seed(0)
    h = torch.randn(300, 64, dtype=torch.float64)
    w = torch.randn(1000, 64, dtype=torch.float64) * 0.1
    y = torch.randint(0, 1000, (300,))
    weights = torch.rand(300, dtype=torch.float64)
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = (torch.nn.functional.cross_entropy(h_ref @ w_ref.t(), y, reduction="none") * weights).sum()
    ref.backward()
    h_dev, w_dev = h.float().to(device).requires_grad_(), w.float().to(device).requires_grad_()
    loss = linear_cross_entropy(h_dev, w_dev, y.to(device), weights.float().to(device))
    loss.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-5
    assert rel_diff(h_dev.grad.double().cpu(), h_ref.grad) < 1e-5
    assert rel_diff(w_dev.grad.double().cpu(), w_ref.grad) < 1e-5


def test_fp32_training_matches_cpu(device=DEVICE):
    """Three optimizer steps of the tiny MoE model from the same weights (CUDA's generator draws
    other numbers than the CPU's): losses, grad norms and final parameters."""
    cfg = make_config("--train-iters 3")
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in GPTModel(cfg.model).state_dict().items()}
    cpu = train_steps(cfg, ProcessGroups(), 3, model_state=init)
    dev = train_steps(cfg, ProcessGroups(device=torch.device(device)), 3, model_state=init)
    for a, b in zip(dev["losses"], cpu["losses"]):
        assert abs(a - b) / b < 1e-4
    for a, b in zip(dev["norms"], cpu["norms"]):
        assert abs(a - b) / b < 1e-3
    for name, p in cpu["params"].items():
        assert rel_diff(dev["params"][name].cpu(), p) < 1e-4, name


def test_bf16_training_learns(device=DEVICE):
    cfg = make_config("--bf16 --train-iters 30 --lr 1e-2 --vocab-size 32 --seq-length 32 "
                      "--max-position-embeddings 32 --global-batch-size 8")
    out = train_steps(cfg, ProcessGroups(device=torch.device(device)), 30, keep_grads=False)
    first, last = out["losses"][0], sum(out["losses"][-5:]) / 5
    assert first > 3.0 and last < first - 1.0, out["losses"]
