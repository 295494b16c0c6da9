"""Benchmarks against the peers: each a script run as a module from the repository root,
``python -m benchmarks.<name> --help`` (docs/benchmarks.md has the commands and results);
``common`` holds what they share."""
