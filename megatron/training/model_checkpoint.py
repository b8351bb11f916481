"""Offline access to whole checkpoints, for the conversion and resharding tools.

    <root>/latest_checkpointed_iteration.txt        an iteration number, or `release`
    <root>/iter_0000100/mp_rank_00/model_optim_rng.pt         EP = 1
    <root>/iter_0000100/mp_rank_00_{000,001,...}/model_optim_rng.pt   expert-parallel ranks
    <root>/iter_0000100/mp_rank_00_PPP[_EEE]/model_optim_rng.pt      pipeline (x expert) ranks
    <root>/iter_0000100/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt    tensor-parallel rank TT's slices

Each file holds at least `model` (the rank's state dict, in one of Megatron-Core's layouts or
ours: `megatron_layout`), `args` (the flag namespace) and `iteration`; ours also `config`
(`dataclasses.asdict` of the run's `Config`). Megatron-LM's own checkpoints have no `config`:
the model is rebuilt from `args`. `load_model_checkpoint` merges pipeline stages (each file's
chunk-local layer numbers placed by the split its `args` describe) and expert-parallel shards
and tensor-parallel slices (joined by the sharding table, `megatron.core.tensor_parallel.sharding`)
into one whole-model state dict in our names. `save_model_checkpoint` writes a converted checkpoint in a
Megatron-Core layout: iteration 0, tracker `release`, no optimizer state (load it for training
with `--finetune`, or `--no-load-optim --no-load-rng`). Files are read with `safe_load`.

Note: Megatron-LM keeps a `release` checkpoint in `<root>/release/`; converted checkpoints go
to `iter_0000000/` with a `release` tracker. Both directory names are read
(`checkpointing.checkpoint_dir_for`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron.core.config import ModelConfig, MoEConfig
from megatron.core.optimizer import is_expert_param
from megatron.core.pipeline_parallel.layout import PipelineLayout
from megatron.core.tensor_parallel.sharding import shard_state, tensor_split
from megatron.training import megatron_layout
from megatron.training.atomic_dir import atomic_directory
from megatron.training.checkpointing import (
    CHECKPOINT_VERSION,
    COMMON,
    TRACKER,
    checkpoint_dir_for,
    is_own_optimizer_state,
    is_torch_dist,
    legacy_rank_files,
    iteration_dir,
    has_model_entry,
    is_model_entry,
    legacy_model_chunks,
    legacy_model_entries,
    rank_dir_name,
    read_tracker,
    saved_tensor_parallel_sizes,
)
from megatron.training.megatron_layout import Layout
from megatron.training.safe_load import load_file, read_dcp_metadata, safe_reader, save_file

MODEL_FILE = "model_optim_rng.pt"
# Model-group flags that do not change the weights' meaning (Megatron-LM allows other values).
_RUN_ONLY_FLAGS = {"moe_token_dispatcher_type", "transformer_impl", "moe_grouped_gemm"}
# Megatron-LM flags that take several values (nargs='+') where ours takes one.
_MEGATRON_LIST_FLAGS = ("moe_router_load_balancing_type", "moe_aux_loss_coeff")
_RANK_DIR = re.compile(r"^mp_rank_(\d\d)(?:_(\d\d\d))?(?:_(\d\d\d))?$")


@dataclass
class ModelCheckpoint:
    """A model's weights and what rebuilds it.

    state_dict: GPTModel names, EP = 1. config: `dataclasses.asdict(Config)` as saved.
    args: the saved flag namespace (None if absent). extra: other payload entries worth
    carrying through a conversion (e.g. `hf_config`, the config.json it came from).
    """

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    config: dict
    args: Optional[argparse.Namespace]
    iteration: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """Our ModelConfig from a checkpoint's flag namespace (Megatron-LM's `args` included: its model
    flags have our names), with the checkpoint's padded vocabulary."""
    from megatron.training.arguments import build_parser, config_from_args, parse_args
    from megatron.training.hf_conversion import RUN_FLAGS

    ours = parse_args(list(RUN_FLAGS))
    model_flags = {a.dest for g in build_parser()._action_groups if g.title in ("model", "mixture of experts")
                   for a in g._group_actions} - _RUN_ONLY_FLAGS
    for name in model_flags:
        value = getattr(args, name, None)
        if isinstance(value, list) and len(value) == 1 and name in _MEGATRON_LIST_FLAGS:
            value = value[0]
        if value is not None:
            setattr(ours, name, value)
    if getattr(args, "padded_vocab_size", None) is None:
        raise ValueError("checkpoint 'args' has no padded_vocab_size, so the model cannot be rebuilt")
    ours.vocab_size, ours.make_vocab_size_divisible_by = args.padded_vocab_size, 1
    try:
        return config_from_args(ours, world_size=1).model
    except ValueError as e:
        raise ValueError(f"checkpoint 'args' do not describe a model this framework builds: {e}") from None


def model_config_from_dict(config: dict) -> ModelConfig:
    """Our ModelConfig from a saved `dataclasses.asdict(Config)` (or of a ModelConfig)."""
    model = dict(config.get("model", config))
    try:
        moe = model.pop("moe", None)
        if moe is not None:
            moe = MoEConfig(**{**moe, "layer_pattern": tuple(moe["layer_pattern"])})
        return ModelConfig(**model, moe=moe)
    except (TypeError, KeyError) as e:
        raise ValueError(f"checkpoint 'config' entry does not describe a model of this version: {e}") from None


def _checkpoint_dir(root: str) -> tuple[str, int]:
    """The iteration directory the tracker names (or `root` itself if it is one), and its iteration."""
    if not os.path.isdir(root):
        raise ValueError(f"--load-dir {root} is not a directory")
    if is_torch_dist(root) or any(_RANK_DIR.match(name) for name in os.listdir(root)):
        match = re.search(r"iter_(\d+)$", os.path.normpath(root))
        return root, int(match.group(1)) if match else 0
    iteration = read_tracker(root, "--load-dir")
    if iteration is None:
        raise ValueError(f"--load-dir {root} has no {TRACKER} and no checkpoint files; is it a Megatron checkpoint?")
    directory = checkpoint_dir_for(root, iteration)
    if not os.path.isdir(directory):
        raise ValueError(f"--load-dir: {TRACKER} names iteration {iteration} but {directory} is missing")
    return directory, iteration


def _rank_dirs(directory: str) -> dict[str, tuple[int, list[int]]]:
    """{`mp_rank_TT[_NNN][_NNN]` directory name: (tensor-parallel rank, its other one or two rank numbers)}."""
    names = {}
    for name in os.listdir(directory):
        match = _RANK_DIR.match(name)
        if match is not None:
            names[name] = (int(match.group(1)), [int(g) for g in match.groups()[1:] if g is not None])
    if not names:
        raise ValueError(f"{directory} has no mp_rank_* directories")
    return names


def _first_rank_file(directory: str) -> str:
    """model_optim_rng.pt of tensor-, pipeline and expert-parallel rank 0 (whose args describe the split)."""
    path = os.path.join(directory, min(_rank_dirs(directory)), MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing")
    return path


def _rank_files(directory: str, pp_size: int, tp_size: int = 1) -> dict[tuple[int, int, int], str]:
    """model_optim_rng.pt of each rank directory: {(tp_rank, pp_rank, ep_rank): path}.

    `mp_rank_TT_NNN` is a pipeline rank when `pp_size` > 1 (the saved args say so), else an
    expert-parallel rank; `mp_rank_TT_PPP_EEE` is both. Every stage needs every tensor-parallel
    rank and every expert-parallel rank; not every (TT, EEE) pair exists when the expert-parallel
    group spans tensor-parallel ranks (MoE parallel folding)."""
    files = {}
    for name, (tp, idx) in _rank_dirs(directory).items():
        if len(idx) == 2 and pp_size == 1:
            raise ValueError(f"{directory}/{name}: a pipeline-parallel rank, but the checkpoint's args say "
                             "pipeline_model_parallel_size 1")
        pp, ep = (idx + [0, 0])[:2] if pp_size > 1 else (0, (idx or [0])[0])
        files[(tp, pp, ep)] = os.path.join(directory, name, MODEL_FILE)
    P = max(k[1] for k in files) + 1
    E = max(k[2] for k in files) + 1
    for pp in range(P):
        tps = {k[0] for k in files if k[1] == pp}
        eps = {k[2] for k in files if k[1] == pp}
        missing = ([f"tensor-parallel rank {t}" for t in range(tp_size) if t not in tps]
                   + [f"expert-parallel rank {e}" for e in range(E) if e not in eps])
        if missing or max(tps) >= tp_size:
            what = ", ".join(missing) or f"tensor-parallel ranks {sorted(tps)} (args say {tp_size})"
            raise ValueError(f"{directory}: rank directories of pipeline rank {pp} are incomplete or unexpected "
                             f"({what})")
    for path in files.values():
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing")
    return files


def merge_expert_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One EP = 1 state dict from each expert-parallel rank's: expert tensors concatenated along
    the expert dim in rank order; every other tensor must be identical on all ranks."""
    return merge_rank_shards({(0, e): s for e, s in enumerate(shards)}, 1, len(shards), 1, swiglu=False)


def merge_rank_shards(shards: dict[tuple[int, int], dict[str, torch.Tensor]], tp_size: int, ep_size: int,
                      etp_size: int, swiglu: bool, etp_of=lambda tp, ep: 0,
                      param_name=lambda key: key) -> dict[str, torch.Tensor]:
    """One whole state dict (T = ETP = EP = 1) from one pipeline stage's rank states
    {(tp_rank, ep_rank): state} (our names, each rank's slices): tensors the sharding table splits
    are joined over the tensor-parallel ranks (experts: over the expert-tensor-parallel ranks
    `etp_of(tp, ep)` of each expert-parallel rank), expert tensors concatenated along the expert
    dimension in expert-parallel rank order; every other tensor must be identical on all ranks.
    `param_name(key)` is a key's parameter name (for keys such as 'name/exp_avg')."""
    first_key = min(shards)
    first = shards[first_key]
    for key, shard in shards.items():
        if set(shard) != set(first):
            raise ValueError(f"rank (tensor-parallel {key[0]}, expert-parallel {key[1]}) holds different tensors "
                             f"than rank (tensor-parallel {first_key[0]}, expert-parallel {first_key[1]})")
    dense = {t: shards[min(k for k in shards if k[0] == t)] for t in range(tp_size)}
    experts = {}
    for k in sorted(shards):
        experts.setdefault((k[1], etp_of(*k)), shards[k])
    missing = [f"expert-parallel rank {e}, expert-tensor-parallel rank {j}"
               for e in range(ep_size) for j in range(etp_size) if (e, j) not in experts]
    if missing:
        raise ValueError(f"no rank file holds the experts of {missing[0]}")
    merged = {}
    for name, tensor in first.items():
        pname = param_name(name)
        split = tensor_split(pname, swiglu)
        if is_expert_param(pname):
            per_ep = [[experts[(e, j)][name] for j in range(etp_size)] for e in range(ep_size)]
            parts = [split.unshard(s) if split is not None else s[0] for s in per_ep]
            merged[name] = parts[0] if ep_size == 1 else torch.cat(parts, dim=0)
        elif split is not None:
            merged[name] = split.unshard([dense[t][name] for t in range(tp_size)])
        else:
            for key, shard in shards.items():
                if not torch.equal(shard[name], tensor):
                    raise ValueError(f"{name} differs between rank (tensor-parallel {first_key[0]}, expert-parallel "
                                     f"{first_key[1]}) and rank (tensor-parallel {key[0]}, expert-parallel {key[1]})")
            merged[name] = tensor
    return merged


def _load_payload(path: str) -> dict:
    payload = load_file(path, "--load-dir")
    if not has_model_entry(payload):
        raise ValueError(f"{path}: checkpoint has no 'model' entry")
    return payload


def _router_rows(states: list[dict]) -> int:
    """Total experts per MoE layer (rows of a router weight); 0 for a dense model."""
    return next((int(t.shape[0]) for state in states for k, t in state.items()
                 if k.endswith(".mlp.router.weight")), 0)


def _saved_num_layers(common: dict) -> int:
    config, args = common.get("config"), common.get("args")
    if config:
        return int(config.get("model", config)["num_layers"])
    if getattr(args, "num_layers", None) is None:
        raise ValueError("checkpoint has neither 'config' nor 'args.num_layers', so its layers cannot be placed")
    return int(args.num_layers)


def _saved_tied(common: dict) -> bool:
    """Whether the checkpoint's model ties input and output embeddings (Megatron's default)."""
    config, args = common.get("config"), common.get("args")
    if config:
        return not config.get("model", config).get("untie_embeddings_and_output_weights", False)
    return not getattr(args, "untie_embeddings_and_output_weights", False)


def saved_pipeline(common: dict) -> PipelineLayout:
    """The layer split the checkpoint's args describe (P = 1 without them)."""
    return megatron_layout.pipeline_from_args(common.get("args"), _saved_num_layers(common))


def _union_of_stages(stages: list[dict]) -> dict:
    """One state dict from each pipeline rank's (global names). A name on two ranks, the tied word
    embedding on the first and last, is the same tensor (kept in sync by training): the first's is kept."""
    merged: dict = {}
    for stage in stages:
        for name, t in stage.items():
            merged.setdefault(name, t)
    return merged


@dataclass
class TrainingCheckpoint:
    """A whole training checkpoint at EP = 1: what `--load` needs, in layout-free form.

    common: the non-tensor entries (iteration, train_state, scheduler, scaler, args, config).
    model: state dict (our names). optimizer: {'step': int, 'state': {name: {moment: tensor}}} or
    None (also for Megatron-LM's optimizer state, which is not read). layout: the legacy files'
    Megatron-Core layout (None for torch_dist). pipeline: the layer split it was saved with.
    """

    common: dict
    model: dict[str, torch.Tensor]
    optimizer: Optional[dict] = None
    layout: Optional[Layout] = None
    pipeline: Optional[PipelineLayout] = None


def load_training_checkpoint(root: str) -> TrainingCheckpoint:
    """Read either format into one whole model with global names: `torch` legacy files of every
    tensor-, pipeline and expert-parallel rank are merged (ours or Megatron-LM's: each chunk's
    local layer numbers placed by the split the saved args describe, tensor-parallel slices
    joined by the sharding table); `torch_dist` is read whole."""
    directory, iteration = _checkpoint_dir(root)
    if os.path.isfile(os.path.join(directory, ".metadata")):
        ckpt = _load_torch_dist_whole(directory)
        ckpt.pipeline = saved_pipeline(ckpt.common)
        return ckpt
    head_path = _first_rank_file(directory)
    head = _load_payload(head_path)  # read once: its args say how the other rank directories divide
    args = head.get("args")
    pp_size = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    tp_size, etp_size = saved_tensor_parallel_sizes(args)
    paths = _rank_files(directory, pp_size, tp_size)
    payloads = {k: head if path == head_path else _load_payload(path) for k, path in paths.items()}
    common = {k: v for k, v in head.items()
              if k not in ("optimizer", "rng_state") and not is_model_entry(k)}
    common.setdefault("iteration", iteration)
    pipeline = saved_pipeline(common)
    P, EP = max(k[1] for k in paths) + 1, max(k[2] for k in paths) + 1
    if pipeline.num_stages != P:
        raise ValueError(f"{directory} has {P} pipeline rank(s) but its args say "
                         f"pipeline_model_parallel_size {pipeline.num_stages}")
    tied, swiglu = _saved_tied(common), _saved_swiglu(common)
    ranks = legacy_rank_files(tp_size, EP, etp_size)
    etp_of = lambda tp, ep: ranks.get((tp, ep), (0, 0))[1]  # noqa: E731
    chunks = {k: legacy_model_chunks(p, pipeline.num_chunks, paths[k]) for k, p in payloads.items()}
    local_experts = _router_rows([c for cs in chunks.values() for c in cs]) // EP
    stages, layouts, stage_moments = [], [], []
    own_optimizer = is_own_optimizer_state(head.get("optimizer"))
    for pp in range(P):
        keys = sorted(k for k in paths if k[1] == pp)
        shards = {}
        for k in keys:
            merged = (chunks[k][0] if pipeline.num_stages == 1 else
                      megatron_layout.merge_pipeline_chunks(chunks[k], pipeline, pp, tied, paths[k]))
            shards[(k[0], k[2])], layout = megatron_layout.from_megatron(merged, local_experts, paths[k])
            layouts.append(layout)
        stages.append(merge_rank_shards(shards, tp_size, EP, etp_size, swiglu, etp_of))
        if own_optimizer:
            moments = {(k[0], k[2]): _flatten_moments(payloads[k]["optimizer"]["state"]) for k in keys}
            stage_moments.append(merge_rank_shards(moments, tp_size, EP, etp_size, swiglu, etp_of,
                                                   lambda key: key.rsplit("/", 1)[0]))
    model = _union_of_stages(stages)
    optimizer = None
    if stage_moments:
        optimizer = {"step": head["optimizer"]["step"], "state": _unflatten_moments(_union_of_stages(stage_moments))}
    layout = next((lay for lay in layouts if lay.experts != "sequential"), layouts[0])
    return TrainingCheckpoint(common, model, optimizer, layout, pipeline)


def _saved_swiglu(common: dict) -> bool:
    """Whether the checkpoint's FFNs are SwiGLU (fc1 = [gate; up], split per half under TP)."""
    config, args = common.get("config"), common.get("args")
    if config:
        return bool(config.get("model", config).get("swiglu", False))
    return bool(getattr(args, "swiglu", False))


def _flatten_moments(state: dict) -> dict[str, torch.Tensor]:
    return {f"{name}/{moment}": t for name, moments in state.items() for moment, t in moments.items()}


def _unflatten_moments(flat: dict[str, torch.Tensor]) -> dict:
    state: dict = {}
    for key, t in flat.items():
        name, moment = key.rsplit("/", 1)
        state.setdefault(name, {})[moment] = t
    return state


def _load_torch_dist_whole(directory: str) -> TrainingCheckpoint:
    """Every tensor of a torch_dist checkpoint at its global shape, in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    common = load_file(os.path.join(directory, COMMON), "--load-dir")
    metadata = read_dcp_metadata(directory, "--load-dir")
    model, moments = {}, {}
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        empty = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        if key.startswith("model."):
            model[key[len("model."):]] = empty
        elif key.startswith("optimizer."):
            name, moment = key[len("optimizer."):].rsplit(".", 1)
            moments.setdefault(name, {})[moment] = empty
    target = {"model": model, **({"optimizer": moments} if moments else {})}
    try:
        dcp.load(target, storage_reader=safe_reader(directory, "--load-dir"), no_dist=True)
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - DCP's error is a BaseException
        raise ValueError(f"cannot read {directory}: {type(e).__name__}; it is corrupt or incomplete") from None
    optimizer = {"step": common.get("optimizer_step", 0), "state": moments} if moments else None
    return TrainingCheckpoint({k: v for k, v in common.items() if k != "optimizer_step"}, model, optimizer)


def split_expert_shards(state: dict[str, torch.Tensor], ep_size: int) -> list[dict[str, torch.Tensor]]:
    """Inverse of `merge_expert_shards`: EP rank r gets experts [r*E/ep, (r+1)*E/ep)."""
    shards = [dict() for _ in range(ep_size)]
    for name, tensor in state.items():
        if is_expert_param(name):
            if tensor.shape[0] % ep_size:
                raise ValueError(f"{tensor.shape[0]} experts ({name}) do not divide over {ep_size} ranks")
            for r, part in enumerate(tensor.chunk(ep_size, dim=0)):
                shards[r][name] = part.clone()
        else:
            for shard in shards:
                shard[name] = tensor
    return shards


def split_rank_shards(state: dict[str, torch.Tensor], tp_size: int, ep_size: int, etp_size: int, swiglu: bool,
                      param_name=lambda key: key) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Inverse of `merge_rank_shards`: {(tp_rank, ep_rank): that legacy file's state} for the files
    of a stage (`legacy_rank_files`): tensor-parallel rank t's slices of the tensors the sharding
    table splits, expert-parallel rank e's experts, sliced for the file's expert-tensor-parallel rank."""
    experts = split_expert_shards(state, ep_size)
    out = {}
    for (t, e), (_, j) in sorted(legacy_rank_files(tp_size, ep_size, etp_size).items()):
        out[(t, e)] = shard_state(experts[e], swiglu, t, tp_size, j, etp_size, param_name)
    return out


def target_tensor_parallel(ckpt: TrainingCheckpoint, tp_size: Optional[int],
                           etp_size: Optional[int] = None) -> tuple[int, int]:
    """(T, ETP) to write: the checkpoint's own for None; ETP defaults to the checkpoint's at the
    same T, else 1 when the checkpoint's is 1, else T (Megatron's default). ValueError naming
    --target-tensor-parallel-size / --target-expert-tensor-parallel-size when they do not divide
    the model's heads, query groups, FFN widths and padded vocabulary."""
    source_T, source_ETP = saved_tensor_parallel_sizes(ckpt.common.get("args"))
    T = source_T if tp_size is None else tp_size
    if etp_size is None:
        etp_size = source_ETP if T == source_T else (1 if source_ETP == 1 else T)
    swiglu = _saved_swiglu(ckpt.common)
    config = ckpt.common.get("config")
    model = config.get("model", config) if config else vars(ckpt.common.get("args") or argparse.Namespace())
    for key, what in (("num_attention_heads", "attention heads"), ("num_query_groups", "query groups")):
        if model.get(key) and model[key] % T:
            raise ValueError(f"--target-tensor-parallel-size {T} does not divide the {model[key]} {what}")
    for name, t in ckpt.model.items():
        split = tensor_split(name, swiglu)
        size, flag = (etp_size, "--target-expert-tensor-parallel-size") if split is not None and split.expert else \
            (T, "--target-tensor-parallel-size")
        width = None if split is None else t.shape[split.dim] // (2 if split.kind == "swiglu" else 1)
        if width is not None and width % size:
            raise ValueError(f"{flag} {size} does not divide {name} (size {width} along dimension {split.dim})")
    return T, etp_size


def legacy_layout(ckpt: TrainingCheckpoint) -> Layout:
    """The Megatron-Core layout legacy output keeps: the input's, or what its flags write."""
    if ckpt.layout is not None and ckpt.layout.experts != "native":
        return ckpt.layout
    args = ckpt.common.get("args")
    return megatron_layout.layout_for(getattr(args, "transformer_impl", "local"),
                                      bool(getattr(args, "moe_grouped_gemm", False)))


def target_pipeline(ckpt: TrainingCheckpoint, pp_size: Optional[int]) -> PipelineLayout:
    """The layer split to write: the checkpoint's own for None or its pipeline size, else an even
    split over `pp_size` stages (ValueError naming --target-pipeline-parallel-size if it does not divide)."""
    source = ckpt.pipeline or saved_pipeline(ckpt.common)
    if pp_size is None or pp_size == source.num_stages:
        return source
    try:
        return PipelineLayout.build(_saved_num_layers(ckpt.common), pp_size)
    except ValueError as e:
        raise ValueError(f"--target-pipeline-parallel-size {pp_size}: {e}") from None


def _retargeted_common(ckpt: TrainingCheckpoint, pipeline: PipelineLayout, ep_size: Optional[int],
                       tensor_parallel: Optional[tuple[int, int]] = None) -> dict:
    """`ckpt.common` with the args (and our config) describing the new pipeline split, EP size
    and (T, ETP)."""
    common = dict(ckpt.common)
    same = pipeline == (ckpt.pipeline or saved_pipeline(common))
    if same and ep_size is None and tensor_parallel is None:
        return common
    changes = {} if same else megatron_layout.pipeline_args(pipeline)
    if ep_size is not None:
        changes["expert_model_parallel_size"] = ep_size
    if tensor_parallel is not None:
        changes["tensor_model_parallel_size"], changes["expert_tensor_parallel_size"] = tensor_parallel
        if tensor_parallel[0] == 1:
            changes["sequence_parallel"] = False
    if common.get("args") is not None:
        common["args"] = argparse.Namespace(**{**vars(common["args"]), **changes})
    if isinstance(common.get("config"), dict) and isinstance(common["config"].get("parallel"), dict):
        parallel = common["config"]["parallel"]
        common["config"] = {**common["config"], "parallel": {**parallel, **{k: v for k, v in changes.items()
                                                                            if k in parallel}}}
    return common


def save_training_checkpoint(root: str, ckpt: TrainingCheckpoint, ckpt_format: str, ep_size: int = 1,
                             pp_size: Optional[int] = None, tp_size: Optional[int] = None,
                             etp_size: Optional[int] = None) -> str:
    """Write `ckpt` into the new directory `root` (atomically) as `torch_dist` (whole tensors,
    loads at any layout) or `torch` legacy files for `pp_size` pipeline ranks (None: the
    checkpoint's own split) times the (tensor-parallel rank, expert-parallel rank) pairs of
    `tp_size` x `ep_size` (x `etp_size`; `target_tensor_parallel` gives the defaults), each with
    its slices (in `legacy_layout`), with Megatron's local layer numbers per model chunk. The
    saved args describe the new layout. RNG states are not carried over: they belong to the old
    layout's ranks."""
    iteration = int(ckpt.common.get("iteration", 0))
    pipeline = target_pipeline(ckpt, pp_size)
    tensor_parallel = target_tensor_parallel(ckpt, tp_size, etp_size)
    tied, swiglu = _saved_tied(ckpt.common), _saved_swiglu(ckpt.common)
    with atomic_directory(root) as tmp:
        directory = iteration_dir(tmp, iteration)
        os.makedirs(directory)
        if ckpt_format == "torch_dist":
            _save_torch_dist_whole(directory, TrainingCheckpoint(
                _retargeted_common(ckpt, pipeline, None, tensor_parallel), ckpt.model, ckpt.optimizer, ckpt.layout,
                pipeline))
        else:
            T, ETP = tensor_parallel
            common = _retargeted_common(ckpt, pipeline, ep_size, tensor_parallel)
            models = split_rank_shards(ckpt.model, T, ep_size, ETP, swiglu)
            moments = (split_rank_shards(_flatten_moments(ckpt.optimizer["state"]), T, ep_size, ETP, swiglu,
                                         lambda key: key.rsplit("/", 1)[0]) if ckpt.optimizer else {})
            layout = legacy_layout(ckpt)
            for pp in range(pipeline.num_stages):
                for (t, r), model in models.items():
                    chunks = megatron_layout.split_pipeline_chunks(model, pipeline, pp, tied)
                    payload = {**common, **legacy_model_entries([megatron_layout.to_megatron(c, layout)
                                                                 for c in chunks])}
                    if ckpt.optimizer:
                        state = {name: m for name, m in _unflatten_moments(moments[(t, r)]).items()
                                 if megatron_layout.chunk_of(name, pipeline, pp, tied) is not None}
                        payload["optimizer"] = {"step": ckpt.optimizer["step"], "state": state}
                    name = rank_dir_name(ep_size, r, pipeline.num_stages, pp, t)
                    os.makedirs(os.path.join(directory, name))
                    save_file(payload, os.path.join(directory, name, MODEL_FILE))
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write(str(iteration))
    return iteration_dir(root, iteration)


def _save_torch_dist_whole(directory: str, ckpt: TrainingCheckpoint) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"model": ckpt.model}
    common = dict(ckpt.common)
    if ckpt.optimizer:
        state["optimizer"] = ckpt.optimizer["state"]
        common["optimizer_step"] = ckpt.optimizer["step"]
    save_file(common, os.path.join(directory, COMMON))
    dcp.save(state, checkpoint_id=directory, no_dist=True)


def load_model_checkpoint(root: str) -> ModelCheckpoint:
    """Weights and config of the checkpoint `root`'s tracker names (or of an iteration dir)."""
    ckpt = load_training_checkpoint(root)
    head = ckpt.common
    if "config" in head:
        model_config = model_config_from_dict(head["config"])
        config = head["config"]
    elif head.get("args") is not None:  # Megatron-LM's checkpoint
        model_config = model_config_from_args(head["args"])
        config = {"model": dataclasses.asdict(model_config)}
    else:
        raise ValueError(f"{root}: checkpoint has neither 'config' nor 'args', so the model cannot be rebuilt")
    extra = {k: head[k] for k in ("hf_config",) if k in head}
    return ModelCheckpoint(model_config, dict(ckpt.model), config, head.get("args"), int(head.get("iteration", 0)),
                           extra)


def save_model_checkpoint(root: str, checkpoint: ModelCheckpoint, layout: Layout = Layout("sequential")) -> str:
    """Write `checkpoint` as a release (iteration 0) legacy checkpoint into `root`, atomically,
    with the model in Megatron-Core's `layout` (default: SequentialMLP, local layer spec).

    `root` must be absent or empty. Returns the path of the model file written.
    """
    transformer_impl = "transformer_engine" if layout.te_norms else "local"
    args = megatron_layout.megatron_args(
        checkpoint.args, checkpoint.model_config, transformer_impl=transformer_impl,
        moe_grouped_gemm=layout.experts in ("te_grouped", "grouped"), ckpt_format="torch",
        expert_model_parallel_size=1, iteration=0, consumed_train_samples=0, consumed_valid_samples=0)
    payload = {
        "model": megatron_layout.to_megatron(checkpoint.state_dict, layout),
        "args": args,
        "config": checkpoint.config,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
        **checkpoint.extra,
    }
    with atomic_directory(root) as tmp:
        rank_dir = os.path.join(iteration_dir(tmp, 0), "mp_rank_00")
        os.makedirs(rank_dir)
        save_file(payload, os.path.join(rank_dir, MODEL_FILE))
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write("release")
    return os.path.join(iteration_dir(root, 0), "mp_rank_00", MODEL_FILE)

