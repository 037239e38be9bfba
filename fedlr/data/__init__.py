"""Data: the built-in task and user datasets (`sources`), partitions, tokenised batches
(`batches`), and the stdlib-docs task's build (`stdlib_docs`)."""
