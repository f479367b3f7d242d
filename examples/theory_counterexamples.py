"""The paper's counterexamples in a few lines: closed forms, measured metrics, and the geometry check's verdict.

    python examples/theory_counterexamples.py            # prints; about a second
    repsim counterexample all --out figures              # the full set, with the synthetic runs and figures
"""

from __future__ import annotations

import math

import repsim.theory as theory

# Theorem 1: CKA -> 1 while Procrustes stays near sqrt(2 - sqrt 2)
for m in (16, 256, 4096):
    th = theory.theorem1(n=m, m=m, eps=1.0)  # n = m, eps^2 = n/m = 1
    cf = th.closed_form
    print(f"m={m:5d}  CKA {cf['cka[linear,biased]']:.4f}  Procrustes {cf['procrustes[distance]']:.4f}  "
          f"Gram-Frobenius {cf['gram_frobenius']:.4f}")
print(f"limit: CKA 1, Procrustes {math.sqrt(2 - math.sqrt(2)):.4f}, Gram-Frobenius 0.5")

# the same construction through the geometry check (n = 200 rows, 4 of them pushed nearly orthogonal)
th = theory.theorem1(200, 4, 3.0, d_s=2)
print(theory.check(th.teacher, th.student, eps=0.15).verdict)

# projection: zero loss, different angles
pc = theory.projection_counterexample()
print(f"projection loss {pc.loss:.1e}; student cos {pc.student_cos_12:.4f}, teacher cos {pc.teacher_cos_12:.1f}")
