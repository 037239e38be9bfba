"""Adapter files and the round trip to and from PEFT models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification

from fedlr.adapters import (
    Adapter,
    LoraFactors,
    from_peft_state_dict,
    load_adapter,
    load_delta_weights,
    peft_config_fields,
    save_adapter,
    to_peft_state_dict,
)
from fedlr.errors import AdapterFileError
from fedlr.lora.lowrank import LowRank
from fedlr.peft_layout import PeftLayout, from_peft_model, load_into_peft_model

TARGETS = ["query", "value"]


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


def peft_model(seed: int = 0, **lora):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        modules_to_save=["classifier"],
        rank_pattern={"value": 2},
        alpha_pattern={"layer.1.attention.self.query": 3},
        **lora,
    )
    model = get_peft_model(tiny_bert(seed), config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # trained-looking, non-zero B
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, config


def merged_deltas(model) -> dict[str, torch.Tensor]:
    """dW per module as PEFT itself computes it (get_delta_weight)."""
    from peft.tuners.lora import LoraLayer

    return {
        n.removeprefix("base_model.model."): m.get_delta_weight("default")
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


@pytest.mark.parametrize("rslora", [False, True])
def test_from_peft_model_matches_peft_delta_and_state_dict(rslora):
    model, config = peft_model(use_rslora=rslora)
    adapter = from_peft_model(model)
    for name, delta in merged_deltas(model).items():
        assert torch.allclose(adapter.lora[name].delta(), delta, atol=1e-6)
    # The state-dict route (with the config's patterns) gives the same scalings and tensors.
    sd = get_peft_model_state_dict(model)
    via_sd = from_peft_state_dict(sd, config.to_dict())
    assert {n: f.scaling for n, f in via_sd.lora.items()} == pytest.approx(
        {n: f.scaling for n, f in adapter.lora.items()}
    )
    back = to_peft_state_dict(adapter)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_load_into_a_fresh_peft_model_reproduces_outputs():
    model, _ = peft_model()
    adapter = from_peft_model(model)
    fresh, _ = peft_model(seed=0)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.zero_()
    load_into_peft_model(fresh, adapter)
    x = torch.randint(0, 64, (3, 7))
    assert torch.allclose(fresh(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)


def test_load_into_model_with_other_scaling_keeps_the_product():
    model, _ = peft_model()
    adapter = from_peft_model(model)
    other = get_peft_model(
        tiny_bert(),
        LoraConfig(
            r=4,
            lora_alpha=32,
            target_modules=TARGETS,
            rank_pattern={"value": 2},
            modules_to_save=["classifier"],
        ),
    )
    load_into_peft_model(other, adapter)
    for name, delta in merged_deltas(other).items():
        assert torch.allclose(delta, adapter.lora[name].delta(), atol=1e-6)


def test_a_layouts_own_copies_leave_the_model_as_it_was_and_read_back_as_loading_would():
    model, _ = peft_model()
    before = from_peft_model(model)
    other, _ = peft_model(seed=5)
    wanted = from_peft_model(other)
    layout = PeftLayout(model)
    copies = layout.tensors(wanted)
    with torch.no_grad():
        for t in copies.values():  # what training does to them
            t.mul_(1.5)
    after = from_peft_model(model)  # the model never saw the copies
    assert all(torch.equal(after.lora[m].A, before.lora[m].A)
               and torch.equal(after.lora[m].B, before.lora[m].B) for m in before.lora)
    read = layout.adapter(copies)
    layout.load(read)
    loaded = from_peft_model(model)
    for m, f in wanted.lora.items():
        assert torch.allclose(read.lora[m].delta(), 1.5**2 * f.delta(), atol=1e-6)
        assert torch.equal(loaded.lora[m].A, read.lora[m].A)
    assert loaded.extras.keys() == wanted.extras.keys() == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(loaded.extras[k], 1.5 * wanted.extras[k]) for k in wanted.extras)


def test_a_layout_refuses_what_the_model_cannot_hold():
    model, _ = peft_model()
    layout, adapter = PeftLayout(model), from_peft_model(model)
    unknown = Adapter(lora={"encoder.nowhere": next(iter(adapter.lora.values()))})
    with pytest.raises(ValueError, match="no LoRA layer for"):
        layout.tensors(unknown)
    with pytest.raises(ValueError, match="no trainable tensor for"):
        layout.tensors(Adapter(extras={"pooler.weight": torch.zeros(2)}))
    module, f = next((m, f) for m, f in adapter.lora.items() if f.rank == 4)
    wrong = Adapter(lora={module: LoraFactors(f.A[:2], f.B[:, :2], f.scaling)})
    with pytest.raises(ValueError, match="build the model with rank 2"):
        layout.tensors(wrong)


def test_save_and_load_round_trip_with_metadata(tmp_path):
    gen = torch.Generator().manual_seed(0)
    adapter = Adapter(
        lora={
            "a.q": LoraFactors(
                torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen), 2.0
            )
        },
        base={
            "a.q": LowRank(torch.randn(5, 3, generator=gen), torch.randn(3, 6, generator=gen)),
            "a.v": torch.randn(5, 6, generator=gen),
        },
        extras={"classifier.weight": torch.randn(3, 5, generator=gen)},
        meta={"num_examples": 17, "client_id": "c3", "round": 2},
    )
    path = tmp_path / "update.safetensors"
    save_adapter(adapter, path)
    loaded = load_adapter(path)
    assert loaded.meta == adapter.meta and loaded.lora["a.q"].scaling == 2.0
    deltas = load_delta_weights(path)
    assert torch.allclose(
        deltas["a.q"],
        2.0 * adapter.lora["a.q"].B @ adapter.lora["a.q"].A + adapter.base["a.q"].dense(),
    )
    assert torch.equal(deltas["a.v"], adapter.base["a.v"])
    assert torch.equal(loaded.extras["classifier.weight"], adapter.extras["classifier.weight"])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_load_delta_weights_reads_a_peft_directory(tmp_path):
    model, _ = peft_model()
    model.save_pretrained(tmp_path / "adapter")
    deltas = load_delta_weights(tmp_path / "adapter")
    for name, delta in merged_deltas(model).items():
        assert torch.allclose(deltas[name], delta, atol=1e-6)


def test_peft_config_fields_reproduce_every_scaling(tmp_path):
    model, _ = peft_model()
    adapter = from_peft_model(model)
    fields = peft_config_fields(adapter)
    rebuilt = get_peft_model(tiny_bert(), LoraConfig(**fields))
    set_peft_model_state_dict(rebuilt, to_peft_state_dict(adapter))
    for name, delta in merged_deltas(rebuilt).items():
        assert torch.allclose(delta, adapter.lora[name].delta(), atol=1e-6)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(AdapterFileError, match="adapter file not found"):
        load_adapter(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_adapter(junk)
    with pytest.raises(AdapterFileError, match="not a PEFT adapter directory"):
        load_adapter(tmp_path)


@pytest.mark.parametrize("broken", ["weights", "config", "config not an object", "mismatch"])
def test_a_corrupt_peft_directory_is_a_clear_error(tmp_path, broken):
    model, _ = peft_model()
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    if broken == "weights":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        message = "adapter_model.safetensors is not a readable safetensors file"
    elif broken == "config":
        (folder / "adapter_config.json").write_text('{"r": 4, ')
        message = "adapter_config.json is not valid JSON"
    elif broken == "config not an object":
        (folder / "adapter_config.json").write_text("[1, 2]")
        message = "is not a PEFT adapter config"
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        config["lora_alpha"] = "sixteen"
        (folder / "adapter_config.json").write_text(json.dumps(config))
        message = "does not describe its weights"
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(folder)
