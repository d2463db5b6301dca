"""The reconstruction pipeline's tuned settings, in one table: CG steps per data-consistency update,
and the classical baselines' weights and iterations.

Each value was chosen on tuning subjects / patients (never evaluation ones) by the benchmark named
beside it; the measurements are in ``benchmarks/results``. Settings are keyed by operator family
(``Task.family``): how many CG steps an update needs depends on the conditioning of A^H A.
"""

from __future__ import annotations

from mediff.solvers import SOLVERS

# CG steps per DDS update (benchmarks/dds_sweep.py --tuning). Single-coil MRI: A^H A = F^H M F is a
# projection, so CG converges in a few steps. Multi-coil SENSE: its spectrum is spread, more steps
# help until the maps' error dominates. CT: ill-conditioned, gains continue well past 20 steps.
# CT on grids finer than 256 px (a 512-px slice's own grid): each step costs 16x a 128-px one, so the
# count is the time / accuracy trade measured there (benchmarks/ct.py --native --cg-iters on tuning
# patients).
DDS_CG_ITERS = {"mri-single": 5, "mri-multi": 20, "ct": 40, "ct-fine": 10}

# Baseline weights in the prior's normalised units. MRI: benchmarks/mri.py --tune (x4, single coil).
# CT: relative to ||A||^2 (the weight passed to tv_reconstruct is lam * ||A||^2), so it does not
# depend on the number of views or the pixel size; benchmarks/ct.py (60 views, training patients).
# CT on grids finer than 256 px: benchmarks/ct.py --native (512 px; 1e-3 at 60 views, 3e-3 at 30).
# Low-dose (PWLS-weighted) data, key + "-pwls": benchmarks/ct.py tuned at I0 = 1e4, 180 views, with
# TV converged (per-entry PDHG steps): 3e-5 at 128 px, 3e-4 at 512 px, lower than for noiseless
# sparse views because the weighted data term is small on the rays through the body.
BASELINE_LAMBDA = {"mri": {"tv": 1.6e-2, "l1wavelet": 1e-3}, "ct": {"tv": 1e-4}, "ct-fine": {"tv": 1e-3},
                   "ct-pwls": {"tv": 3e-5}, "ct-fine-pwls": {"tv": 3e-4}}

# Iterations of the iterative baselines. CT's PDHG converges slowly on the ill-conditioned projector:
# more iterations, started at FBP.
BASELINE_ITERS = {"mri": 200, "ct": 500}


def cg_iters(family: str, method: str) -> int:
    """CG steps per update of diffusion solver ``method`` on an operator of ``family``: DDS's follow the
    operator (``DDS_CG_ITERS``), the other solvers run their ``SolverSpec.cg_iters`` (0: no prox)."""
    return DDS_CG_ITERS[family] if method == "dds" else SOLVERS[method].cg_iters
