"""GPTModel: attention against an explicit reference, RoPE, causality, loss accounting."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.moe import experts
from megatron.core.models.gpt import GPTModel, language_model_loss
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.rope import RotaryEmbedding, apply_rotary
from tests.helpers import make_config


def test_attention_matches_explicit_gqa_reference():
    torch.manual_seed(0)
    cfg = make_config("--position-embedding-type none").model
    attn = SelfAttention(cfg)
    x = torch.randn(2, 7, 32)
    out = attn(x)
    H, G, d = 4, 2, 8
    q, k, v = attn.split_qkv(attn.linear_qkv(x))
    scores = torch.einsum("bshd,bthd->bhst", q, k.repeat_interleave(H // G, dim=2)) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(7, 7, dtype=torch.bool), 1), float("-inf"))
    ctx = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v.repeat_interleave(H // G, dim=2))
    torch.testing.assert_close(out, attn.linear_proj(ctx.reshape(2, 7, H * d)), rtol=1e-5, atol=1e-6)


def test_qkv_layout_is_grouped_per_kv_head():
    cfg = make_config().model
    attn = SelfAttention(cfg)
    # Feature f of the fused output belongs to group f // ((H/G + 2) d).
    qkv = torch.arange((4 + 2 * 2) * 8, dtype=torch.float32).view(1, 1, -1)
    q, k, v = attn.split_qkv(qkv)
    width = (2 + 2) * 8
    assert q[0, 0, 2, 0] == width  # first query head of group 1
    assert k[0, 0, 0, 0] == 2 * 8 and v[0, 0, 0, 0] == 3 * 8
    assert k[0, 0, 1, 0] == width + 2 * 8


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, rotary_percent=0.5, base=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope(torch.arange(32))

    def score(m, n):
        qm = apply_rotary(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rotary(k, cos[n:n + 1], sin[n:n + 1])
        return float((qm * kn).sum())

    assert math.isclose(score(5, 2), score(25, 22), rel_tol=1e-4)
    assert not math.isclose(score(5, 2), score(5, 4), rel_tol=1e-3)
    rotated = apply_rotary(q, cos[3:4], sin[3:4])
    torch.testing.assert_close(rotated[..., 8:], q[..., 8:])  # only the first 50% is rotated


@pytest.mark.parametrize("extra", ["", "--position-embedding-type learned_absolute --normalization LayerNorm",
                                   "--num-experts 4 --moe-layer-freq ([0]+[1])"])
def test_model_is_causal(extra):
    torch.manual_seed(0)
    model = GPTModel(make_config(extra).model).eval()
    tokens = torch.randint(0, 64, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    with torch.no_grad():
        a, b = model(tokens).logits_BSV, model(changed).logits_BSV
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_lm_loss_excludes_aux_and_matches_cross_entropy():
    torch.manual_seed(0)
    model = GPTModel(make_config("--moe-aux-loss-coeff 0.5 --moe-z-loss-coeff 0.1").model).train()
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))
    mask = (torch.rand(2, 16) > 0.3).float()
    out = model(tokens, labels_BS=labels, loss_mask_BS=mask)
    torch.manual_seed(0)
    logits = model(tokens).logits_BSV
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(out.lm_loss, (ce * mask.flatten()).sum() / mask.sum())
    assert out.aux_loss > 0.5 * 0.9  # aux ~= coeff at near balance, plus z-loss
    expected_aux = sum(0.5 * r.stats.load_balancing_loss + 0.1 * r.stats.z_loss for r in out.routings)
    torch.testing.assert_close(out.aux_loss, expected_aux)


def test_tied_and_untied_output_layers():
    tied = GPTModel(make_config().model)
    assert tied.output_layer is None and tied.output_weight() is tied.embedding.word_embeddings.weight
    untied = GPTModel(make_config("--untie-embeddings-and-output-weights").model)
    assert "output_layer.weight" in untied.state_dict()


def test_language_model_loss_mask():
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    ce = F.cross_entropy(logits[0], labels[0], reduction="none")
    torch.testing.assert_close(language_model_loss(logits, labels, mask), (ce[0] + ce[2]) / 2)


def test_grouped_mm_probe_is_independent_of_grad_mode():
    experts._grouped_mm_works.cache_clear()
    with torch.no_grad():
        in_eval = experts._grouped_mm_works("cpu", torch.float32)
    experts._grouped_mm_works.cache_clear()
    assert in_eval == experts._grouped_mm_works("cpu", torch.float32)


@pytest.mark.parametrize("granularity", ["--recompute-granularity full", "--recompute-granularity selective",
                                         "--recompute-granularity full --recompute-method uniform --recompute-num-layers 2",
                                         "--recompute-granularity full --recompute-method block --recompute-num-layers 1",
                                         "--moe-layer-recompute"])
def test_recompute_gives_same_gradients(granularity):
    from megatron.training.train import recompute_plan

    cfg = make_config(granularity)
    torch.manual_seed(0)
    plain = GPTModel(make_config().model)
    torch.manual_seed(0)
    recomputed = GPTModel(cfg.model, recompute=recompute_plan(cfg))
    tokens = torch.randint(0, 64, (2, 16))
    experts._grouped_mm_works.cache_clear()  # the first forward probes grouped_mm inside the checkpoint
    for m in (recomputed, plain):
        out = m(tokens, labels_BS=tokens)
        (out.lm_loss + out.aux_loss).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
