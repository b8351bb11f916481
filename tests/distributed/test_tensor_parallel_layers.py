"""Tensor-parallel collectives and layers on 2 gloo ranks equal the single-device computation.

One spawn runs every check (each rank rebuilds the unsharded reference from the same seed) and
returns {check name: max relative difference}; the tests only read that table.
"""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from megatron.core.fusions.linear_cross_entropy import linear_cross_entropy
from megatron.core.fusions.swiglu import swiglu
from megatron.core.tensor_parallel import cross_entropy, layers, mappings
from tests.distributed.harness import run_distributed

WORLD = 2
TOL = 1e-5


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny): one number per compared pair."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _seeded(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def check_mappings(group, rank: int, world: int) -> dict:
    out = {}
    ws = [_seeded(100 + r, 2, 4, 3) for r in range(world)]  # per-rank upstream weights
    w_sum = sum(ws)
    # copy: identity forward, gradient summed over ranks.
    x = _seeded(1, 2, 4, 3).requires_grad_()
    y = mappings.copy_to_tensor_parallel_region(x, group)
    (y * ws[rank]).sum().backward()
    out["copy/fwd"], out["copy/grad"] = rel_diff(y, x), rel_diff(x.grad, w_sum)
    # reduce: sum forward, gradient passed through.
    xs = [_seeded(10 + r, 2, 4, 3) for r in range(world)]
    x = xs[rank].clone().requires_grad_()
    y = mappings.reduce_from_tensor_parallel_region(x, group)
    (y * ws[rank]).sum().backward()
    out["reduce/fwd"], out["reduce/grad"] = rel_diff(y, sum(xs)), rel_diff(x.grad, ws[rank])
    for dim in (0, 1):
        full = _seeded(2, 4, 6, 3)
        x = full.chunk(world, dim)[rank].clone().requires_grad_()
        y = mappings.gather_from_sequence_parallel_region(x, group, dim)
        (y * _seeded(200 + rank, 4, 6, 3)).sum().backward()
        w_sum6 = sum(_seeded(200 + r, 4, 6, 3) for r in range(world))
        out[f"gather{dim}/fwd"] = rel_diff(y, full)
        out[f"gather{dim}/grad"] = rel_diff(x.grad, w_sum6.chunk(world, dim)[rank])
        parts = [_seeded(20 + r, 4, 6, 3) for r in range(world)]
        x = parts[rank].clone().requires_grad_()
        y = mappings.reduce_scatter_to_sequence_parallel_region(x, group, dim)
        wl = [_seeded(300 + r, 4, 6, 3).chunk(world, dim)[r] for r in range(world)]
        (y * wl[rank]).sum().backward()
        out[f"reduce_scatter{dim}/fwd"] = rel_diff(y, sum(parts).chunk(world, dim)[rank])
        out[f"reduce_scatter{dim}/grad"] = rel_diff(x.grad, torch.cat(wl, dim))
        x = full.clone().requires_grad_()
        y = mappings.scatter_to_sequence_parallel_region(x, group, dim)
        (y * wl[rank]).sum().backward()
        out[f"scatter{dim}/fwd"] = rel_diff(y, full.chunk(world, dim)[rank])
        out[f"scatter{dim}/grad"] = rel_diff(x.grad, torch.cat(wl, dim))
    return out


def _ref_and_grads(fn, inputs: list, upstream: torch.Tensor):
    """fn(*inputs) and d(sum(out * upstream))/d(each input), on one device."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _sp_in(x_BSD: torch.Tensor, group, sp: bool) -> torch.Tensor:
    """This rank's input leaf: the full x, or its sequence shard under sequence parallelism."""
    x = mappings.split_along_dim(x_BSD, group, 1) if sp else x_BSD.clone()
    return x.requires_grad_()


def _sp_ref(t_BSD: torch.Tensor, group, sp: bool) -> torch.Tensor:
    return mappings.split_along_dim(t_BSD, group, 1) if sp else t_BSD


def check_column(group, rank: int, world: int) -> dict:
    out = {}
    x, w, b, g = _seeded(1, 2, 4, 8), _seeded(2, 12, 8), _seeded(3, 12), _seeded(4, 2, 4, 12)
    y_ref, (dx, dw, db) = _ref_and_grads(F.linear, [x, w, b], g)
    for sp in (False, True):
        layer = layers.ColumnParallelLinear.from_full(w, b, group, sequence_parallel=sp)
        xl = _sp_in(x, group, sp)
        y = layer(xl)
        (y * layers.split_rows(g.movedim(-1, 0), group).movedim(0, -1)).sum().backward()
        tag = f"sp={sp}"
        out[f"{tag}/y"] = rel_diff(y, layers.split_rows(y_ref.movedim(-1, 0), group).movedim(0, -1))
        out[f"{tag}/dx"] = rel_diff(xl.grad, _sp_ref(dx, group, sp))
        out[f"{tag}/dw"] = rel_diff(layer.weight.grad, layers.split_rows(dw, group))
        out[f"{tag}/db"] = rel_diff(layer.bias.grad, layers.split_rows(db, group))
    return out


def check_row(group, rank: int, world: int) -> dict:
    out = {}
    x, w, b, g = _seeded(1, 2, 4, 12), _seeded(2, 8, 12), _seeded(3, 8), _seeded(4, 2, 4, 8)
    y_ref, (dx, dw, db) = _ref_and_grads(F.linear, [x, w, b], g)
    for sp in (False, True):
        layer = layers.RowParallelLinear.from_full(w, b, group, sequence_parallel=sp)
        xl = layers.split_columns(x.flatten(0, 1), group).view(2, 4, -1).requires_grad_()
        y = layer(xl)
        (y * _sp_ref(g, group, sp)).sum().backward()
        layers.all_reduce_sequence_parallel_grads(layer.parameters(), group)
        tag = f"sp={sp}"
        out[f"{tag}/y"] = rel_diff(y, _sp_ref(y_ref, group, sp))
        out[f"{tag}/dx"] = rel_diff(xl.grad, layers.split_columns(dx.flatten(0, 1), group).view(2, 4, -1))
        out[f"{tag}/dw"] = rel_diff(layer.weight.grad, layers.split_columns(dw, group))
        out[f"{tag}/db"] = rel_diff(layer.bias.grad, db)
    return out


def check_embedding(group, rank: int, world: int) -> dict:
    out = {}
    w, g = _seeded(1, 16, 8), _seeded(2, 2, 4, 8)
    tokens = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(3))
    y_ref, (dw,) = _ref_and_grads(lambda t: F.embedding(tokens, t), [w], g)
    for sp in (False, True):
        layer = layers.VocabParallelEmbedding.from_full(w, group, sequence_parallel=sp)
        y = layer(tokens)
        (y * _sp_ref(g, group, sp)).sum().backward()
        out[f"sp={sp}/y"] = rel_diff(y, _sp_ref(y_ref, group, sp))
        out[f"sp={sp}/dw"] = rel_diff(layer.weight.grad, layers.split_rows(dw, group))
    return out


def check_swiglu_mlp(group, rank: int, world: int) -> dict:
    """fc1 (column, [gate; up] split) -> swiglu -> fc2 (row) equals the unsharded MLP."""
    out = {}
    D, Fh = 8, 12
    x, w1, b1 = _seeded(1, 2, 4, D), _seeded(2, 2 * Fh, D), _seeded(3, 2 * Fh)
    w2, b2, g = _seeded(4, D, Fh), _seeded(5, D), _seeded(6, 2, 4, D)
    mlp = lambda x, w1, b1, w2, b2: F.linear(swiglu(F.linear(x, w1, b1)), w2, b2)  # noqa: E731
    y_ref, (dx, dw1, db1, dw2, db2) = _ref_and_grads(mlp, [x, w1, b1, w2, b2], g)
    for sp in (False, True):
        fc1 = layers.ColumnParallelLinear.from_full(w1, b1, group, sp, split=layers.split_swiglu_fc1)
        fc2 = layers.RowParallelLinear.from_full(w2, b2, group, sp)
        xl = _sp_in(x, group, sp)
        y = fc2(swiglu(fc1(xl)))
        (y * _sp_ref(g, group, sp)).sum().backward()
        layers.all_reduce_sequence_parallel_grads(fc2.parameters(), group)
        tag = f"sp={sp}"
        out[f"{tag}/y"] = rel_diff(y, _sp_ref(y_ref, group, sp))
        out[f"{tag}/dx"] = rel_diff(xl.grad, _sp_ref(dx, group, sp))
        out[f"{tag}/dw1"] = rel_diff(fc1.weight.grad, layers.split_swiglu_fc1(dw1, group))
        out[f"{tag}/db1"] = rel_diff(fc1.bias.grad, layers.split_swiglu_fc1(db1, group))
        out[f"{tag}/dw2"] = rel_diff(fc2.weight.grad, layers.split_columns(dw2, group))
        out[f"{tag}/db2"] = rel_diff(fc2.bias.grad, db2)
    return out


def _tp_attention(x, qkv, proj, heads: int, groups: int, head_dim: int):
    """This rank's heads: x -> column QKV -> causal GQA attention -> row proj (attention.py's layout)."""
    qkv_BSX = qkv(x)
    B, S, _ = qkv_BSX.shape
    per = heads // groups
    q, k, v = qkv_BSX.view(B, S, groups, per + 2, head_dim).split([per, 1, 1], dim=3)
    q, k, v = q.reshape(B, S, heads, head_dim).transpose(1, 2), k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups != heads)
    return proj(o.transpose(1, 2).reshape(B, S, heads * head_dim))


def check_attention(group, rank: int, world: int) -> dict:
    """Column QKV split by query groups -> attention on H/T heads -> row proj equals SelfAttention."""
    from megatron.core.transformer.attention import SelfAttention
    from tests.helpers import TINY_FLAGS, make_config

    out = {}
    cfg = make_config(base=TINY_FLAGS.replace("--disable-bias-linear", "")).model  # biases on
    torch.manual_seed(7)
    ref = SelfAttention(cfg)
    with torch.no_grad():
        ref.linear_qkv.bias.normal_()
        ref.linear_proj.bias.normal_()
    x, g = _seeded(1, 2, 8, cfg.hidden_size), _seeded(2, 2, 8, cfg.hidden_size)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * g).sum().backward()
    T = mappings.group_size(group)
    H, G, d = ref.num_heads // T, ref.num_groups // T, ref.head_dim
    for sp in (False, True):
        qkv = layers.ColumnParallelLinear.from_full(ref.linear_qkv.weight, ref.linear_qkv.bias, group, sp,
                                                    split=layers.split_qkv(ref.num_groups))
        proj = layers.RowParallelLinear.from_full(ref.linear_proj.weight, ref.linear_proj.bias, group, sp)
        xl = _sp_in(x, group, sp)
        y = _tp_attention(xl, qkv, proj, H, G, d)
        (y * _sp_ref(g, group, sp)).sum().backward()
        layers.all_reduce_sequence_parallel_grads(proj.parameters(), group)
        tag = f"sp={sp}"
        out[f"{tag}/y"] = rel_diff(y, _sp_ref(y_ref, group, sp))
        out[f"{tag}/dx"] = rel_diff(xl.grad, _sp_ref(xr.grad, group, sp))
        out[f"{tag}/dqkv_w"] = rel_diff(qkv.weight.grad, layers.split_rows(ref.linear_qkv.weight.grad, group))
        out[f"{tag}/dqkv_b"] = rel_diff(qkv.bias.grad, layers.split_rows(ref.linear_qkv.bias.grad, group))
        out[f"{tag}/dproj_w"] = rel_diff(proj.weight.grad, layers.split_columns(ref.linear_proj.weight.grad, group))
        out[f"{tag}/dproj_b"] = rel_diff(proj.bias.grad, ref.linear_proj.bias.grad)
    return out


def check_cross_entropy(group, rank: int, world: int) -> dict:
    """Vocab-parallel fused loss (chunked, masked) equals full softmax cross-entropy and the fused loss."""
    out = {}
    B, S, D, V = 2, 6, 8, 20
    h, w = _seeded(1, B, S, D), _seeded(2, V, D)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    mask = (torch.rand(B * S, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    weights = mask / mask.sum()

    def full_ce(h, w):
        per_token = F.cross_entropy(F.linear(h.flatten(0, 1), w), labels.flatten(), reduction="none")
        return (per_token * weights).sum()

    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss_ref = full_ce(hr, wr)
    loss_ref.backward()
    fused = linear_cross_entropy(h.flatten(0, 1), w, labels.flatten(), weights)
    out["fused_reference"] = rel_diff(fused, loss_ref)
    for sp in (False, True):
        for chunk in (None, 5):  # one chunk; uneven chunks of 5 tokens
            wl = layers.split_rows(w, group).requires_grad_()
            hl = _sp_in(h, group, sp)
            loss = cross_entropy.vocab_parallel_cross_entropy_loss(hl, wl, labels, weights, group, sp, chunk)
            (2.0 * loss).backward()
            tag = f"sp={sp}/chunk={chunk}"
            out[f"{tag}/loss"] = rel_diff(loss, loss_ref)
            out[f"{tag}/dh"] = rel_diff(hl.grad, 2.0 * _sp_ref(hr.grad, group, sp))
            out[f"{tag}/dw"] = rel_diff(wl.grad, 2.0 * layers.split_rows(wr.grad, group))
    return out


CHECKS = [check_mappings, check_column, check_row, check_embedding, check_swiglu_mlp, check_attention,
          check_cross_entropy]


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    group = dist.new_group(list(range(world)))
    results = {}
    for check in CHECKS:
        results.update({f"{check.__name__}:{k}": v for k, v in check(group, rank, world).items()})
    return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, WORLD)


def _assert_close(results: list[dict], prefix: str) -> None:
    names = [k for k in results[0] if k.startswith(prefix)]
    assert names, prefix
    bad = {f"rank{r}:{k}": res[k] for r, res in enumerate(results) for k in names if not res[k] < TOL}
    assert not bad, bad


def test_mappings(results):
    _assert_close(results, "check_mappings:")


def test_identity_without_group():
    x = torch.randn(2, 4, 3, requires_grad=True)
    for fn in (mappings.copy_to_tensor_parallel_region, mappings.reduce_from_tensor_parallel_region,
               mappings.gather_from_sequence_parallel_region, mappings.reduce_scatter_to_sequence_parallel_region,
               mappings.scatter_to_sequence_parallel_region):
        assert fn(x, None) is x


@pytest.mark.parametrize("check", ["column", "row", "embedding", "swiglu_mlp", "attention", "cross_entropy"])
def test_layers_equal_single_device(results, check):
    _assert_close(results, f"check_{check}:")


def test_split_qkv_refuses_groups_not_dividing_tp(monkeypatch):
    monkeypatch.setattr(layers, "group_size", lambda group: 2)
    with pytest.raises(ValueError, match="query groups"):
        layers.split_qkv(3)(torch.zeros(6, 1), object())
