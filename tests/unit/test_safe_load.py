"""Checkpoint files are read without running code from them, and still hold what checkpoints hold."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch

from megatron.training.safe_load import MEGATRON_STAND_INS, CheckpointError, load_file, read_dcp_metadata
from tests.megatron_fixtures import AttnBackend, CudaGraphScope, ModelType, megatron_core_names

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "megatron_lm_0.16.1_args_globals.txt")

# One value per global that Megatron-LM 0.16.1 pickles in `args` (see the fixture's header).
SAMPLES = {
    "argparse.Namespace": argparse.Namespace(a=1),
    "megatron.core.enums.ModelType": ModelType.encoder_or_decoder,
    "megatron.core.transformer.enums.AttnBackend": AttnBackend.auto,
    "megatron.core.transformer.enums.CudaGraphScope": CudaGraphScope.attn,
    "signal.Signals": signal.Signals.SIGTERM,
    "torch.bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
}


def fixture_names() -> list[str]:
    with open(FIXTURE) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


class Marker:
    """Unpickling this creates the file `path`: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_every_global_of_megatron_lm_args_loads(tmp_path):
    names = fixture_names()
    assert set(names) <= set(SAMPLES), "a global without a sample: add it here and to safe_load"
    args = argparse.Namespace(**{name.replace(".", "_"): SAMPLES[name] for name in names})
    with megatron_core_names():
        torch.save({"args": args}, tmp_path / "ckpt.pt")
    loaded = load_file(str(tmp_path / "ckpt.pt"))["args"]
    assert loaded.megatron_core_transformer_enums_AttnBackend.name == "auto"
    assert loaded.megatron_core_transformer_enums_AttnBackend.value == 5
    assert loaded.megatron_core_enums_ModelType.name == "encoder_or_decoder"
    assert loaded.signal_Signals is signal.Signals.SIGTERM and loaded.torch_bfloat16 is torch.bfloat16


def test_stand_ins_are_exactly_the_megatron_classes_of_the_fixture():
    assert sorted(MEGATRON_STAND_INS) == sorted(n for n in fixture_names() if n.startswith("megatron."))


def test_unknown_enum_value_from_another_megatron_version_still_loads(tmp_path):
    import enum
    import sys
    import types

    later = enum.Enum("AttnBackend", {"future": 42}, module="megatron.core.transformer.enums", qualname="AttnBackend")
    module = types.ModuleType("megatron.core.transformer.enums")
    module.AttnBackend = later
    sys.modules[module.__name__] = module
    try:
        torch.save({"args": argparse.Namespace(attention_backend=later.future)}, tmp_path / "c.pt")
    finally:
        del sys.modules[module.__name__]
    assert load_file(str(tmp_path / "c.pt"))["args"].attention_backend.value == 42


def test_rng_states_and_old_transformer_engine_extra_state_load(tmp_path):
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None, "rng_tracker_states": {}}
    torch.save({"rng_state": [rng], "extra": io.BytesIO(b"te"), "config": {"moe": (1, 0)}}, tmp_path / "r.pt")
    loaded = load_file(str(tmp_path / "r.pt"))
    state = loaded["rng_state"][0]["np_rng_state"]
    assert state[0] == "MT19937" and np.array_equal(state[1], np.random.get_state()[1])
    assert loaded["extra"].getvalue() == b"te"


def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {}, "args": Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        load_file(str(tmp_path / "evil.pt"), "--load")
    message = str(e.value)
    assert "refusing to unpickle io.open" in message and str(tmp_path / "evil.pt") in message
    assert "\n" not in message and not marker.exists()


def test_truncated_file_is_corrupt_not_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(1000)}}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_file(str(tmp_path / "cut.pt"))


def test_metadata_with_code_is_refused_and_truncated_metadata_is_corrupt(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    metadata = read_dcp_metadata(str(tmp_path / "ok"))
    assert list(metadata.state_dict_metadata) == ["w"]

    marker = tmp_path / "ran"
    metadata.planner_data = Marker(marker)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle io\.open from .*evil/\.metadata"):
        read_dcp_metadata(str(tmp_path / "evil"))
    assert not marker.exists()

    data = (tmp_path / "ok" / ".metadata").read_bytes()
    (tmp_path / "ok" / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        read_dcp_metadata(str(tmp_path / "ok"))


def test_saving_writes_stand_ins_back_under_megatron_core_names(tmp_path):
    from megatron.training.safe_load import save_file

    with megatron_core_names():
        torch.save({"args": argparse.Namespace(backend=AttnBackend.auto, kind=ModelType.encoder_or_decoder)},
                   tmp_path / "megatron.pt")
    save_file(load_file(str(tmp_path / "megatron.pt")), tmp_path / "resaved.pt")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "resaved.pt")
    assert sorted(names) == ["argparse.Namespace", "megatron.core.enums.ModelType",
                             "megatron.core.transformer.enums.AttnBackend"]
    assert load_file(str(tmp_path / "resaved.pt"))["args"].backend.name == "auto"
