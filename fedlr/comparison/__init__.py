"""`fedlr compare`: the strategies on one federation, side by side (plan, results, report).

Flower-free: the plan is a list of `fedlr simulate` settings that differ only where a
comparison must (strategy, privacy level, seed); the results are read back from their run
directories, which also prove that every run saw the same federation."""
