"""Named mutants: each a plausible privacy bug, written as one small source change to product
code, and the tests that must fail once it is in (`scripts/mutants.py` runs them; the
pytest plugin `mutant_plugin` puts the change in before any test imports the module).

A mutant that no listed test kills is a privacy claim the suite does not guard. The change is in
effect in the pytest process only (not in Ray workers or subprocesses), so each listed test must
run the mutated code in the test's own process."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # the product module changed (imported, mutated, before the tests run)
    old: str  # occurs exactly once in the module's source
    new: str
    tests: tuple[str, ...]  # pytest node ids: any one failing on an assertion kills the mutant
    why: str  # the bug it plays


NODE_PRIVACY = "tests/test_node_privacy.py"
CLIENT_DP = "tests/test_client_dp.py"
CLIENT_DP_RUN = "tests/test_client_dp_run.py"

MUTANTS = (
    Mutant(
        "noise-seeded-from-the-job", "fedlr.client.training",
        "None if dp_seed is None else dp_seed + 1)", "seed)",
        (f"{NODE_PRIVACY}::test_the_noise_alone_is_never_replayed",),
        "DP-SGD's noise from the job's seed (known to the server), batches still from the OS"),
    Mutant(
        "batches-seeded-from-the-job", "fedlr.client.training",
        'batch_gen = private_generator("cpu", dp_seed)',
        'batch_gen = private_generator("cpu", seed)',
        (f"{NODE_PRIVACY}::test_the_batches_alone_are_never_replayed",),
        "Poisson batches from the job's seed, noise still from the OS"),
    Mutant(
        "noise-halved", "fedlr.client.step_engines",
        '"noise_multiplier": plan.noise_multiplier,',
        '"noise_multiplier": plan.noise_multiplier / 2,',
        ("tests/test_dp_training.py",),
        "half the noise the ledger records"),
    Mutant(
        "noise-quartered", "fedlr.client.step_engines",
        '"noise_multiplier": plan.noise_multiplier,',
        '"noise_multiplier": plan.noise_multiplier / 4,',
        ("tests/test_empirical_audit.py::test_an_audit_flags_a_trainer_that_adds_a_quarter_of_the"
         "_noise_it_records",),
        "a quarter of the noise the ledger records"),
    Mutant(
        "first-k-examples", "fedlr.client.samplers",
        "        yield from UniformWithReplacementSampler(num_samples=self.n, "
        "sample_rate=self.sample_rate,\n"
        "                                                 generator=self.generator, "
        "steps=self.steps)",
        "        yield from (list(range(len(b))) for b in UniformWithReplacementSampler(\n"
        "            num_samples=self.n, sample_rate=self.sample_rate, generator=self.generator,\n"
        "            steps=self.steps))",
        (f"{NODE_PRIVACY}::test_every_example_joins_each_batch_independently_at_rate_q",),
        "Poisson batch sizes, but always the first k examples"),
    Mutant(
        "one-step-per-round", "fedlr.client.training",
        "ledger.record(plan.segment, poisson=run.sampler.poisson)",
        "ledger.record((*plan.segment[:2], 1), poisson=run.sampler.poisson)",
        ("tests/test_privacy.py::test_target_epsilon_solves_sigma_once_for_the_planned_run",),
        "the accountant told of one step a round instead of each step"),
    Mutant(
        "shorter-server-ledger-adopted", "fedlr.privacy.node",
        "if theirs.steps > own.steps and theirs.extends(own):",
        "if own.extends(theirs) or theirs.extends(own):",
        (f"{NODE_PRIVACY}::test_the_node_keeps_the_longer_history_and_ignores_a_shorter_or_"
         "different_one",),
        "the node takes the server's shorter ledger, forgetting steps it trained"),
    Mutant(
        "client-dp-weighted-by-examples", "fedlr.privacy.client_level",
        "            total[key].add_(t)\n",
        "            total[key].add_(t, alpha=update.num_examples)\n",
        (f"{CLIENT_DP}::test_one_client_release_is_its_clipped_delta_over_m",),
        "DP-FedAvg's release weighted by example count (leaks n_k, breaks the sensitivity)"),
    Mutant(
        "client-dp-normalised-example-weights", "fedlr.privacy.client_level",
        "            total[key].add_(t)\n",
        "            total[key].add_(t, alpha=len(updates) * update.num_examples\n"
        "                            / sum(u.num_examples for u in updates))\n",
        (f"{CLIENT_DP}::test_the_release_is_the_same_whatever_the_clients_example_counts",),
        "FedAvg's n_k / n weights (times the clients) inside DP-FedAvg's sum"),
    Mutant(
        "client-dp-clips-at-2c", "fedlr.privacy.client_level",
        "client_delta(strategy, state, update, start), config.clip_norm, cid",
        "client_delta(strategy, state, update, start), 2 * config.clip_norm, cid",
        (f"{CLIENT_DP}::test_clipping_bounds_every_update",),
        "updates clipped at 2C while the accountant assumes C"),
)
MUTANTS += (
    Mutant(
        "client-sample-from-seed-and-round", "fedlr.lora.rounds",
        "chosen = draw_clients(ids, per_round, private_sampling, SECURE_RANDOM)",
        "chosen = draw_clients(ids, per_round, private_sampling, "
        'random.Random(f"{seed}:{round_}"))',
        (f"{CLIENT_DP}::test_the_secret_client_sample_is_never_replayed_from_the_seed_and_round",),
        "client-level DP's secret sample drawn from the published seed and the round"),
    Mutant(
        "coordinator-samples-from-the-seed", "fedlr.server.coordinator",
        "seed=config.seed, private_sampling=dp and dp.sampling)",
        "seed=config.seed, private_sampling=None)",
        (f"{CLIENT_DP}::test_the_servers_own_draw_of_the_client_sample_is_never_replayed",),
        "the coordinator calling the seeded sampler under client-level DP (run.json's seed)"),
    Mutant(
        "server-noise-from-run-seed", "fedlr.federation",
        "generator=private_generator())",
        "generator=private_generator(seed=config.seed))",
        (f"{CLIENT_DP}::test_the_servers_noise_is_never_replayed_from_the_run_seed",),
        "DP-FedAvg's noise drawn from the published run seed"),
)
MUTANTS += (
    Mutant(
        "secagg-one-share-rebuilds-b", "fedlr.privacy.secagg.client",
        'b_shares = crypto.split(b, kept["threshold"], len(holders))',
        'b_shares = crypto.split(b, 1 if me == "0" else kept["threshold"], len(holders))',
        ("tests/test_secagg.py::test_fewer_shares_than_the_threshold_never_rebuild_a_clients_"
         "self_mask_seed",),
        "one client splits its self-mask seed with threshold 1: any one holder can unmask it"),
    Mutant(
        "secagg-32-bit-mask-seed", "fedlr.privacy.secagg.crypto",
        'encryptor = Cipher(algorithms.ChaCha20(seed, b"\\0" * 16), mode=None).encryptor()',
        "encryptor = Cipher(algorithms.ChaCha20(hashlib.sha256(seed[:4]).digest(), "
        'b"\\0" * 16), mode=None).encryptor()',
        ("tests/test_secagg.py::test_a_mask_stream_depends_on_every_byte_of_its_seed",),
        "mask streams keyed by 32 bits of their seed: a server can try every key"),
)
MUTANTS += (
    Mutant(
        "noisy-sum-over-realised-batch", "fedlr.client.training",
        "                engine.step([i - n for i in indices if i >= n])\n",
        "                engine.optimizer.expected_batch_size = max(1, len(indices))\n"
        "                engine.step([i - n for i in indices if i >= n])\n",
        ("tests/test_dp_training.py::test_a_trainer_step_adds_noise_of_std_sigma_c_over_q_n_"
         "whatever_batch_it_drew",),
        "the noisy sum averaged over the realised |B| (Poisson's sensitivity needs q N)"),
    Mutant(
        "shuffled-pass-binomial-sizes", "fedlr.client.samplers",
        "        yield from UniformWithReplacementSampler(num_samples=self.n, "
        "sample_rate=self.sample_rate,\n"
        "                                                 generator=self.generator, "
        "steps=self.steps)",
        "        order: list[int] = []\n"
        "        for b in UniformWithReplacementSampler(num_samples=self.n, "
        "sample_rate=self.sample_rate,\n"
        "                                               generator=self.generator, "
        "steps=self.steps):\n"
        "            if len(order) < len(b):\n"
        "                order += torch.randperm(self.n, generator=self.generator).tolist()\n"
        "            yield order[:len(b)]\n"
        "            order = order[len(b):]",
        (f"{NODE_PRIVACY}::test_every_example_joins_each_batch_independently_at_rate_q",),
        "Binomial batch sizes, but batches cut from shuffled passes (not independent draws)"),
)
MUTANTS += (
    Mutant(
        "secagg-client-accepts-any-threshold", "fedlr.privacy.secagg.client",
        "holders < 2 * threshold and threshold <= holders", "1 <= threshold <= holders",
        ("tests/test_attack_replies.py::test_a_secagg_client_refuses_a_threshold_the_protocol"
         "_does_not_hold_under",),
        "a client that splits its secrets at whatever threshold the server sends (t = 1)"),
    Mutant(
        "canaries-every-step", "fedlr.client.training",
        "                engine.step([i - n for i in indices if i >= n])\n",
        "                engine.step(list(range(canaries.count)) if canaries else [])\n",
        ("tests/test_empirical_audit.py::test_canaries_are_drawn_by_the_trainers_sampler_at_its"
         "_rate",),
        "an audit's canaries added to every step, outside the trainer's sampler"),
    Mutant(
        "canaries-own-bernoulli", "fedlr.client.training",
        "                engine.step([i - n for i in indices if i >= n])\n",
        "                engine.step(torch.nonzero(torch.rand(canaries.count) < plan.sample_rate)"
        ".flatten().tolist() if canaries else [])\n",
        ("tests/test_empirical_audit.py::test_canaries_are_drawn_by_the_trainers_sampler_at_its"
         "_rate",),
        "canaries drawn at the right rate by a sampler of their own, not the trainer's batches"),
)
MUTANTS += (
    Mutant(
        "client-ids-in-metrics", "fedlr.server.coordinator",
        '        record["aggregation_exact"] = result.exact\n',
        '        record["aggregation_exact"] = result.exact\n        record["cohort"] = clients\n',
        (f"{CLIENT_DP_RUN}::test_client_level_epsilon_is_dp_accountings_and_no_file_names_a"
         "_client",),
        "the secret client sample written to metrics.jsonl under a new key"),
    Mutant(
        "client-ids-in-adapter-metadata", "fedlr.server.coordinator",
        "        self.run.save_global(round_, self.global_adapter(new_state))\n",
        "        released = self.global_adapter(new_state)\n"
        "        released.meta[\"contributors\"] = \",\".join(clients)\n"
        "        self.run.save_global(round_, released)\n",
        (f"{CLIENT_DP_RUN}::test_client_level_epsilon_is_dp_accountings_and_no_file_names_a"
         "_client",),
        "the secret client sample in the released adapter's safetensors metadata"),
    Mutant(
        "secagg-pairwise-seed-from-public-keys", "fedlr.privacy.secagg.crypto",
        "    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose)"
        ".derive(secret)\n",
        "    if b\"masks\" in purpose:\n"
        "        secret = b\"\".join(sorted([public_of(private), public]))\n"
        "    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose)"
        ".derive(secret)\n",
        ("tests/test_secagg.py::test_pairwise_masks_need_a_private_key_the_server_never_holds",),
        "pairwise mask seeds derived from the two public keys alone (the server has both)"),
)
BY_NAME = {m.name: m for m in MUTANTS}
