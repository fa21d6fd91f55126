"""``vismem demo``: the main job end to end on the embedded defaults (local Ray, Beam DirectRunner).

Run: ``make demo`` (fresh clone: installs, then this). Default sizes: about 4 minutes on 2 CPU
cores after a 3.5-4 minute installation (7.3-8.5 minutes from a fresh clone, measured); ``--full``
uses all 60,000 + 10,000 images (hours here).

1. Fashion-MNIST training images (Debian package) are embedded with EfficientNet-Lite0 by the Ray
   pipeline; half of them are treated as unlabelled. A teacher (a linear probe fit on the
   human-labelled half) pseudo-labels them, and its accuracy is measured against the hidden labels.
   (The EfficientNet ImageNet head with the Fashion-MNIST label map is a real teacher too, but it
   maps only a few percent of these images to a class; ``vismem embed --teacher`` runs it.)
2. A sharded ScaNN memory is built from the human- and teacher-labelled rows by the Beam job.
3. The test images are embedded and the memory is evaluated (every rule, every k, the honest figure).
4. Every capability experiment runs: memory-size scaling (human labels, then plus the pseudo-labelled
   pool), new classes (held-out Fashion-MNIST classes, then real MNIST digits from another
   dataset), unlearning, pruning, a newly discovered class in a class tree, and the
   interpretability page.
5. ``OUT/report.md`` ties it together with the findings, stated honestly.

Embeddings are cached: a re-run resumes the embedding jobs and skips finished stages.
"""
