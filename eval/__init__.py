"""Evaluations of a memory: figures from one retrieval pass, the paper's experiments, explanations, re-ranking."""
