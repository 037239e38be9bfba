"""Secure aggregation (SecAgg+, Bell et al. CCS 2020): each round the server learns the weighted
sum of the participating clients' updates, never one client's update.

Flower-free, like the strategies: `crypto` (key agreement, mask expansion, Shamir shares and the
authenticated encryption of shares, on Flower's and `cryptography`'s primitives), `graph` (who
shares with whom), `encoding` (fixed-point encoding of what a strategy sums), `client` (a
client's four stages) and `server` (the round driver and the unmasking). The Flower glue only
carries `Parts` (`fedlr.client.jobs`, `fedlr.server.coordinator`).
"""
