"""Hierarchical label prediction (section 3.6, Algorithm 1 of Appendix H) over a class tree.

Descend the tree from the root; at each level pick the child whose examples' within-class distance
distribution is closest to the query's distances to those examples, by the p-value of a two-sample
Kolmogorov-Smirnov test (largest p wins). A query of a class the memory has never seen still lands
in the right part of the tree when its neighbours there look like it.

A tree file is JSON: ``{"name": ..., "children": [...]}``; leaves are class names of the memory.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
from scipy.stats import ks_2samp


@dataclasses.dataclass
class Node:
    name: str
    children: list

    def leaves(self) -> list:
        return [self.name] if not self.children else [c for ch in self.children for c in ch.leaves()]

    def depth(self) -> int:
        return 0 if not self.children else 1 + max(ch.depth() for ch in self.children)


def parse_tree(obj) -> Node:
    if not isinstance(obj, dict) or "name" not in obj:
        raise ValueError(f"a tree node must be an object with a 'name', got {obj!r:.80}")
    return Node(str(obj["name"]), [parse_tree(c) for c in obj.get("children", [])])


def load_tree(path: str, class_names=None) -> Node:
    """Read a tree file; with ``class_names``, check its leaves are exactly the memory's classes."""
    with open(path) as f:
        tree = parse_tree(json.load(f))
    if class_names is not None:
        leaves = tree.leaves()
        missing = sorted(set(class_names) - set(leaves))
        unknown = sorted(set(leaves) - set(class_names))
        if missing or unknown or len(leaves) != len(set(leaves)):
            raise ValueError(f"tree {path} does not match the memory's classes: classes not in the tree "
                             f"{missing}, tree leaves that are not classes {unknown}")
    return tree


def _distances(a, b):
    return 1.0 - a @ b.T


def within_distances(examples: np.ndarray, max_examples: int = 300, seed: int = 0) -> np.ndarray:
    """Pairwise cosine distances among (a sample of) a node's examples, self-pairs left out."""
    if len(examples) > max_examples:
        examples = examples[np.random.default_rng(seed).choice(len(examples), max_examples, replace=False)]
    d = _distances(examples, examples)
    return d[~np.eye(len(examples), dtype=bool)]


def predict_path(query: np.ndarray, tree: Node, embeddings: np.ndarray, labels: np.ndarray,
                 class_names: list, *, max_examples: int = 300, cache: dict | None = None) -> list:
    """Algorithm 1: the node names chosen at each level, root's child first, for one query.

    ``embeddings``/``labels`` are the memory items (L2-normalised); a child with fewer than two
    examples in memory cannot be tested and is skipped. ``cache`` keeps within-class distances
    between calls.
    """
    cache = {} if cache is None else cache
    index = {name: i for i, name in enumerate(class_names)}
    path, node = [], tree
    while node.children:
        best, best_p = None, -np.inf
        for child in node.children:
            ids = [index[c] for c in child.leaves() if c in index]
            examples = embeddings[np.isin(labels, ids)]
            if len(examples) < 2:
                continue
            if child.name not in cache:
                cache[child.name] = within_distances(examples, max_examples)
            sample = examples if len(examples) <= max_examples else examples[
                np.random.default_rng(1).choice(len(examples), max_examples, replace=False)]
            cross = _distances(query[None, :], sample)[0]
            p = ks_2samp(cross, cache[child.name]).pvalue
            if p > best_p:
                best, best_p = child, p
        if best is None:
            break
        path.append(best.name)
        node = best
    return path


def level_accuracy(paths: list, true_leaves: list, tree: Node) -> list:
    """Accuracy at each level: the predicted node at level l is the true leaf's ancestor at l."""
    def ancestors(node, target, trail):
        if node.name == target and not node.children:
            return trail
        for ch in node.children:
            found = ancestors(ch, target, trail + [ch.name])
            if found is not None:
                return found
        return None

    depth = tree.depth()
    correct = np.zeros(depth)
    for path, leaf in zip(paths, true_leaves):
        truth = ancestors(tree, leaf, [])
        if truth is None:
            raise ValueError(f"class {leaf!r} is not a leaf of the tree")
        for level in range(min(len(path), len(truth))):
            correct[level] += path[level] == truth[level]
    return (correct / max(len(paths), 1)).tolist()
