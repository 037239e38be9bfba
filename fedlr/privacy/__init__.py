"""Privacy, in one package, for both units it protects.

- `sample_level`: DP-SGD accounting of one client's examples (the ledger, Opacus's and
  dp-accounting's epsilons, the noise for a target, OS-entropy generators).
- `epsilon_cache`: each Opacus epsilon computed once per machine, shared by its processes.
- `client_level`: DP-FedAvg around a strategy, and its accounting (one client's whole data).
- `node`: the node's own ledger on disk and the limits it enforces against any server.
- `accountants`, `plan`, `solve`, `planners`: sizing a run before it starts.
- `report`: what a run writes to privacy.json; `audit`, `bounds`, `client_audit`: auditing it.

The sample-level canary audit trains, so it lives with the client (`fedlr.client.canaries`,
`fedlr.client.empirical_audit`). Nothing is imported here, so `fedlr.privacy.accountants` loads
without torch.
"""
