"""The manifest describes the shipped files exactly, and they hold builtin ops only."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from maskfl.agent.training import LocalTrainer
from maskfl.models import (
    CONTRACT_VERSION,
    ShippedModel,
    model_path,
    shipped_model,
    shipped_models,
)
from maskfl.protocol.errors import ConfigError

MODELS_DIR = Path(str(resources.files("maskfl.models")))
BUILTIN_NAMES = {
    value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


def op_names(blob: bytes) -> list[str]:
    """Operator names read straight from the flatbuffer (independent of build.py)."""
    model = schema.Model.GetRootAsModel(blob, 0)
    names = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.add(code.CustomCode().decode())
        else:
            names.add(BUILTIN_NAMES[builtin])
    return sorted(names)


def test_manifest_lists_every_shipped_file() -> None:
    raw = json.loads((MODELS_DIR / "manifest.json").read_text())
    assert raw["contract_version"] == CONTRACT_VERSION
    on_disk = sorted(p.name for p in MODELS_DIR.glob("*.tflite"))
    assert sorted(m.file for m in shipped_models()) == on_disk
    assert {m.name for m in shipped_models()} >= {"mlp", "cnn"}


@pytest.mark.parametrize("model", shipped_models(), ids=lambda m: m.name)
def test_manifest_entry_matches_file(model: ShippedModel) -> None:
    blob = model.path.read_bytes()
    assert model.path == model_path(model.name)
    assert model.read_bytes() == blob
    assert model.size == len(blob)
    assert model.sha256 == hashlib.sha256(blob).hexdigest()
    assert list(model.ops) == op_names(blob)
    assert not [op for op in model.ops if op.startswith("Flex") or op == "CUSTOM"]


@pytest.mark.parametrize("model", shipped_models(), ids=lambda m: m.name)
def test_manifest_entry_matches_the_loaded_model(model: ShippedModel) -> None:
    spec = LocalTrainer.shipped(model.name).spec
    assert spec.num_params == model.num_params
    assert spec.input_shape == model.input_shape
    assert spec.num_classes == model.num_classes
    assert spec.signatures == model.signatures
    assert spec.sha256 == model.sha256


@pytest.mark.parametrize("model", shipped_models(), ids=lambda m: m.name)
def test_initial_weights_are_the_graphs_own_bit_for_bit(model: ShippedModel) -> None:
    data = model.initial_weights_path.read_bytes()
    assert model.initial_weights_sha256 == hashlib.sha256(data).hexdigest()
    weights = model.initial_weights()
    graph = np.asarray(LocalTrainer.shipped(model.name).get_weights())
    assert weights.dtype == np.float32 and weights.shape == (model.num_params,)
    assert weights.tobytes() == graph.astype(np.float32).tobytes()
    assert np.any(weights != 0)  # a ReLU network does not learn from zeros


def test_initial_weights_files_are_listed() -> None:
    on_disk = sorted(p.name for p in MODELS_DIR.glob("*.npy"))
    assert sorted(m.initial_weights_file for m in shipped_models()) == on_disk


def test_flex_fixture_is_seen_as_flex() -> None:
    blob = (Path(__file__).parent / "data" / "flex_ops.tflite").read_bytes()
    assert any(op.startswith("Flex") for op in op_names(blob))


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="mlp") as info:
        shipped_model("resnet")
    assert info.value.field == "model"
