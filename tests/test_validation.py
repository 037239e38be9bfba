"""Every malformed-update kind is rejected with its reason; the round goes on or fails cleanly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from federation import client_updates, random_spec

from fedlr.errors import ConfigError, RoundFailedError
from fedlr.lora.rounds import aggregate_round
from fedlr.lora.strategies import ClientUpdate, make_strategy
from fedlr.lora.validation import ValidationPolicy, update_norm


def setup(name: str = "fedit", ranks=(4, 8, 2), extras: bool = True):
    gen = torch.Generator().manual_seed(7)
    strategy = make_strategy(name, random_spec(gen, list(ranks), extras=extras))
    state = strategy.init_state({"classifier.weight": torch.zeros(3, 8, dtype=torch.float64)})
    return strategy, state, client_updates(strategy, state, gen)


def replace_module(update: ClientUpdate, **changes) -> ClientUpdate:
    name = sorted(update.adapter.lora)[0]
    lora = dict(update.adapter.lora)
    lora[name] = dataclasses.replace(lora[name], **changes)
    return dataclasses.replace(update, adapter=dataclasses.replace(update.adapter, lora=lora))


def corrupt(update: ClientUpdate, kind: str) -> ClientUpdate:
    lora = dict(update.adapter.lora)
    name = sorted(lora)[0]
    f = lora[name]
    if kind == "unknown module":
        lora["not.a.module"] = f
    elif kind == "missing module":
        del lora[name]
    elif kind == "wrong shape":
        return replace_module(update, A=f.A[:, :-1])
    elif kind == "rank above assignment":
        return replace_module(
            update,
            A=torch.cat([f.A, f.A]),
            B=torch.cat([f.B, f.B], dim=1),
        )
    elif kind == "nan":
        B = f.B.clone()
        B[0, 0] = float("nan")
        return replace_module(update, B=B)
    elif kind == "inf":
        A = f.A.clone()
        A[-1, -1] = float("inf")
        return replace_module(update, A=A)
    elif kind == "norm":
        return replace_module(update, B=f.B * 1e6)
    elif kind == "unknown client":
        return dataclasses.replace(update, client_id="intruder")
    elif kind == "num_examples":
        return dataclasses.replace(update, num_examples=0)
    elif kind == "extras":
        extras = {"classifier.weight": torch.zeros(5, 5, dtype=torch.float64)}
        return dataclasses.replace(
            update, adapter=dataclasses.replace(update.adapter, extras=extras)
        )
    return dataclasses.replace(update, adapter=dataclasses.replace(update.adapter, lora=lora))


CASES = {
    "unknown module": "unknown modules ['not.a.module']",
    "missing module": "missing modules",
    "wrong shape": "wrong shape in",
    "rank above assignment": "above the client's assigned rank 4",
    "nan": "non-finite values",
    "inf": "non-finite values",
    "norm": "exceeds max_update_norm",
    "unknown client": "has no rank assignment",
    "num_examples": "num_examples must be a positive integer",
    "extras": "wrong shape in classifier.weight",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_malformed_update_is_rejected_and_the_round_goes_on(kind):
    strategy, state, updates = setup()
    policy = ValidationPolicy(max_update_norm=1e4)
    bad = corrupt(updates[0], kind)
    result = aggregate_round(strategy, state, [bad, *updates[1:]], policy=policy)
    assert [r.client_id for r in result.rejected] == [bad.client_id]
    assert CASES[kind] in result.rejected[0].reason
    assert result.accepted == [u.client_id for u in updates[1:]]
    # The aggregate is exactly what the valid clients alone produce.
    alone, _ = strategy.aggregate(state, updates[1:])
    for name, x in result.state.lora.items():
        assert torch.equal(x.dense(), alone.lora[name].dense())


def test_frozen_a_that_changed_is_rejected():
    strategy, state, updates = setup("ffa")
    f = updates[1].adapter.lora[sorted(updates[1].adapter.lora)[0]]
    bad = replace_module(updates[1], A=f.A + 1e-3)
    result = aggregate_round(strategy, state, [updates[0], bad, updates[2]])
    assert result.rejected[0].client_id == bad.client_id
    assert "ffa freezes A" in result.rejected[0].reason


def test_duplicate_client_is_rejected():
    strategy, state, updates = setup()
    result = aggregate_round(strategy, state, [*updates, updates[0]])
    assert [r.reason for r in result.rejected] == [
        "duplicate update from the same client in one round"
    ]


def test_too_few_valid_updates_fail_the_round_and_keep_the_state():
    strategy, state, updates = setup()
    flat_before = {k: v.clone() for k, v in state.to_tensors()[0].items()}
    bad = [corrupt(u, "nan") for u in updates[:2]]
    with pytest.raises(RoundFailedError, match=r"round 1: 1 valid update\(s\), at least 2 needed"):
        aggregate_round(
            strategy, state, [*bad, updates[2]], policy=ValidationPolicy(min_valid_updates=2)
        )
    flat_after = state.to_tensors()[0]
    assert state.round == 0 and all(torch.equal(flat_before[k], flat_after[k]) for k in flat_before)


def test_update_norm_is_the_change_of_dw_from_the_downlink():
    strategy, state, updates = setup(extras=False)
    start = strategy.downlink(state, updates[0].client_id)
    assert update_norm(dataclasses.replace(updates[0], adapter=start), start) == 0.0
    expected = (
        sum(
            float(torch.linalg.matrix_norm(f.delta() - start.lora[n].delta())) ** 2
            for n, f in updates[0].adapter.lora.items()
        )
        ** 0.5
    )
    assert abs(update_norm(updates[0], start) - expected) <= 1e-10 * expected


def test_policy_errors():
    with pytest.raises(ConfigError, match="max_update_norm"):
        ValidationPolicy(max_update_norm=0)
    with pytest.raises(ConfigError, match="min_valid_updates"):
        ValidationPolicy(min_valid_updates=-1)


def test_flora_update_norm_counts_from_a_fresh_lora():
    strategy, state, updates = setup("flora", extras=False)
    norms = {
        u.client_id: sum(
            float(torch.linalg.matrix_norm(f.delta())) ** 2 for f in u.adapter.lora.values()
        )
        ** 0.5
        for u in updates
    }
    bound = sorted(norms.values())[1] * (1 + 1e-9)
    result = aggregate_round(
        strategy, state, updates, policy=ValidationPolicy(max_update_norm=bound)
    )
    assert sorted(result.accepted) == sorted(c for c, n in norms.items() if n <= bound)
    assert all("exceeds max_update_norm" in r.reason for r in result.rejected)
