"""The two planners: a private run's noise for a target epsilon, or its epsilon for a noise, at
sample level (DP-SGD) and at client level (DP-FedAvg); see `fedlr.privacy.plan`."""

from __future__ import annotations

from fedlr.errors import ConfigError
from fedlr.privacy.accountants import SAMPLING_MODES, check_accountant
from fedlr.privacy.plan import (
    PRV_CEILING,
    SAMPLE_ADJACENCY,
    SAMPLE_UNIT,
    PrivacyPlan,
    check_count,
    check_delta,
    check_one_of,
    quiet_absl,
    reported_epsilon,
    sample_rate_of,
    solved_plan,
    solving_accountant,
)
from fedlr.privacy.solve import MAX_NOISE, MIN_NOISE, Unreachable, smallest_noise

# -- sample level -----------------------------------------------------------------------------


@quiet_absl()
def plan_sample_level(
    *,
    delta: float,
    rounds: int,
    local_steps: int,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    sample_rate: float | None = None,
    batch_size: int | None = None,
    examples_per_client: int | None = None,
    accountant: str = "prv",
    cross_check: bool = True,
) -> PrivacyPlan:
    """DP-SGD on each client for `rounds * local_steps` steps at sample rate q.

    Give exactly one of `target_epsilon` (the smallest sigma, to a factor 1 + REL_TOL, whose
    epsilon is at most the target: what a client solves itself) or `noise_multiplier`.
    Give q as `sample_rate`, or as `batch_size` and `examples_per_client`.
    """
    from fedlr.privacy.sample_level import dp_accounting_epsilon, noise_for_target, opacus_epsilon

    check_one_of(target_epsilon, noise_multiplier, "noise multiplier")
    check_delta(delta)
    check_count("rounds", rounds)
    check_count("local steps", local_steps)
    q, notes = sample_rate_of(sample_rate, batch_size, examples_per_client)
    check_accountant("sample", accountant)
    steps = rounds * local_steps

    def history(sigma: float) -> list[tuple[float, float, int]]:
        return [(sigma, q, steps)]

    accountant = solving_accountant(accountant, target_epsilon, notes, "PRV is slow there")
    if target_epsilon is not None:
        # RDP is never below PRV: if RDP reaches the target at MAX_NOISE, PRV does too
        at_cap = opacus_epsilon(history(MAX_NOISE), delta, "rdp")
        if at_cap > target_epsilon and accountant == "prv":
            at_cap = opacus_epsilon(history(MAX_NOISE), delta, "prv")
        if at_cap > target_epsilon:
            raise ConfigError(
                f"target epsilon {target_epsilon:g} is out of reach: even noise multiplier "
                f"{MAX_NOISE:g} gives epsilon {at_cap:.4g} over {steps} steps at q={q:.4g} "
                f"(delta {delta:g}); plan fewer rounds or local steps, or a smaller q (smaller "
                "batches or more examples per client)"
            )
        sigma = noise_for_target(target_epsilon, delta, q, steps, accountant)
    else:
        assert noise_multiplier is not None
        sigma = float(noise_multiplier)

    rdp_eps = opacus_epsilon(history(sigma), delta, "rdp")
    epsilon, used = reported_epsilon(
        sigma, accountant, rdp_eps, lambda: opacus_epsilon(history(sigma), delta, accountant),
        solved=target_epsilon is not None, notes=notes,
        no_noise="no noise: the gradients are released as they are, no guarantee",
        skipped="PRV and PLD skipped (slow, and no meaningful guarantee remains); Opacus RDP, an "
                "upper bound, is shown")

    checks: dict[str, float] = {}
    if cross_check and sigma > 0:
        methods = ("pld", "rdp") if rdp_eps <= PRV_CEILING else ("rdp",)
        for method in methods:
            checks[f"dp-accounting {method}"] = dp_accounting_epsilon(history(sigma), delta, method)
    notes.append(
        "per client that trains in every round; a client that skips rounds spends less; no "
        "amplification from client sampling is claimed"
    )
    return PrivacyPlan(
        level="sample",
        privacy_unit=SAMPLE_UNIT,
        adjacency=SAMPLE_ADJACENCY,
        **solved_plan(delta, rounds, target_epsilon, sigma, epsilon, f"opacus {used}", checks),
        local_steps=local_steps,
        steps=steps,
        sample_rate=q,
        batch_size=batch_size,
        examples_per_client=examples_per_client,
        notes=tuple(notes),
    )


@quiet_absl()
def plan_client_level(
    *,
    delta: float,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    sampling: str = "poisson",
    accountant: str = "rdp",
    cross_check: bool = True,
) -> PrivacyPlan:
    """DP-FedAvg over `rounds` rounds, `clients_per_round` of `num_clients` sampled each round
    (expected number for Poisson, exact for fixed-size sampling without replacement).

    Give exactly one of `target_epsilon` (the smallest z, to a factor 1 + REL_TOL, whose epsilon
    is at most the target) or `noise_multiplier` z (noise std z S on the sum of clipped updates).
    """
    from fedlr.privacy.client_level import (
        ClientDPConfig,
        client_level_description,
        client_level_epsilon,
    )
    from fedlr.privacy.sample_level import opacus_epsilon

    check_one_of(target_epsilon, noise_multiplier, "client noise multiplier")
    check_delta(delta)
    check_count("rounds", rounds)
    check_count("number of clients", num_clients)
    check_count("clients per round", clients_per_round)
    if clients_per_round > num_clients:
        raise ConfigError(
            f"clients per round ({clients_per_round}) cannot exceed the number of clients "
            f"({num_clients})"
        )
    if sampling not in SAMPLING_MODES:
        raise ConfigError(f"unknown client sampling {sampling!r}; choose one of {SAMPLING_MODES}")
    check_accountant("client", accountant)

    def config(z: float, acc: str = accountant) -> ClientDPConfig:
        return ClientDPConfig(
            noise_multiplier=z, clip_norm=1.0, sampling=sampling, delta=delta, accountant=acc
        )

    cache: dict[tuple[float, str], float] = {}

    def eps(z: float, acc: str) -> float:
        if (z, acc) not in cache:
            cache[z, acc] = client_level_epsilon(
                config(z, acc), num_clients=num_clients, per_round=clients_per_round, rounds=rounds
            )
        return cache[z, acc]

    def eps_rdp(z: float) -> float:
        return eps(z, "rdp")

    def eps_pld(z: float) -> float:
        # PLD's discretisation runs out of memory at huge epsilon. It is only asked about targets
        # <= PRV_CEILING, which a z whose RDP epsilon (never below PLD's) is over twice that
        # misses by far: report that bound, and the search moves past the z
        bound = eps_rdp(z)
        return bound if bound > 2 * PRV_CEILING else eps(z, "pld")

    config(1.0)  # pld with fixed-size sampling is refused here, with its fix
    description = client_level_description(config(1.0), num_clients, clients_per_round)
    q = clients_per_round / num_clients
    notes: list[str] = []
    used = solving_accountant(accountant, target_epsilon, notes, "PLD runs out of memory there")
    if target_epsilon is not None:
        try:
            # RDP is cheap and never below PLD: its z brackets PLD's from above
            z = smallest_noise(eps_rdp, target_epsilon)
            if used == "pld":
                z = smallest_noise(eps_pld, target_epsilon, start=z, factor=1.25)
        except Unreachable as exc:
            fewer = "fewer clients per round or more clients" if q < 1 else "more clients"
            raise ConfigError(
                f"target epsilon {target_epsilon:g} is out of reach: even client noise "
                f"multiplier {MAX_NOISE:g} gives epsilon {exc.epsilon:.4g} over {rounds} rounds "
                f"with {clients_per_round} of {num_clients} clients per round (delta {delta:g}); "
                f"plan fewer rounds, or {fewer} (a smaller client sampling rate)"
            ) from None
        if z <= MIN_NOISE:
            notes.append(
                f"target epsilon {target_epsilon:g} is met by any noise >= {MIN_NOISE:g}: it "
                "protects next to nothing"
            )
    else:
        assert noise_multiplier is not None
        z = float(noise_multiplier)

    rdp_eps = eps_rdp(z)
    epsilon, used = reported_epsilon(
        z, used, rdp_eps, lambda: eps(z, used),  # a z solved by PLD was evaluated: cached
        solved=target_epsilon is not None, notes=notes,
        no_noise="no noise: the clipped sum is released as it is, no guarantee",
        skipped="PLD skipped (it runs out of memory there, and no meaningful guarantee "
                "remains); RDP, an upper bound, is shown")

    checks: dict[str, float] = {}
    if cross_check and z > 0 and sampling == "poisson":
        if used != "rdp":
            checks["dp-accounting rdp"] = rdp_eps
        if rdp_eps <= PRV_CEILING:
            if used != "pld":
                checks["dp-accounting pld"] = eps(z, "pld")
            checks["opacus prv"] = opacus_epsilon([(z, q, rounds)], delta, "prv")
        else:
            notes.append(f"epsilon above {PRV_CEILING:g}: PLD and PRV cross-checks skipped")
    elif cross_check and z > 0:
        notes.append(
            "no cross-check: only dp-accounting's RDP accounts fixed-size sampling without "
            "replacement (replace-one adjacency); sample Poisson to compare accountants"
        )
    if sampling == "fixed":
        notes.append("sensitivity 2 S under replace-one adjacency; z is relative to S")
    notes.append(
        "covers what the server releases; example counts, client metrics and the list of "
        "sampled clients are outside the guarantee"
    )
    return PrivacyPlan(
        level="client",
        privacy_unit=description["privacy_unit"],
        adjacency=description["adjacency"],
        **solved_plan(delta, rounds, target_epsilon, z, epsilon, f"dp-accounting {used}", checks),
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        sampling=sampling,
        notes=tuple(notes),
    )
