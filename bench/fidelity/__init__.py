"""Fidelity in miniature (issue 10): toy Wan, procedural data, SALAD comparisons. See __main__.py."""
