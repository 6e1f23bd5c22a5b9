"""Does locality help under DINO? The backbone comparison as one command.

Design: docs/architecture.md#the-study.

A grid of DINO pretrainings that differ only in the backbone and the seed (same steps, data
order, augmentations, head and schedules), every final teacher evaluated with k-NN, the
linear probe, frozen segmentation and Hummingbird, plus the baselines that give the numbers
meaning: the untrained network of each arch, and raw pixels through every evaluator. Every
training and evaluation is one submitit job in its own folder (SLURM: evaluations wait for
their training with afterok; local: one job after another). A piece whose outputs exist is
skipped, an interrupted training resumes from its checkpoint. The study ends by writing
results.json, a figure and a table (mean and spread over seeds per arch, and the difference
to the first arch; a difference within the spread is a tie).

Its steps, one module each: :mod:`.plan` (the pieces, their flags and the budget),
:mod:`.run` (submitting and following them), :mod:`.report` (results.json, table, figure),
:mod:`.combine` (one report from parts run apart, e.g. seed by seed).

Layout of ``--output_dir`` (results.json records paths relative to it)::

    runs/<arch>_seed<N>/        training output (checkpoint.pth, log.txt, TensorBoard)
        eval_<name>/            one evaluation (results.json, study_piece.json, jobs/)
    untrained/<arch>/           the untrained network (checkpoint.pth) and its evaluations
    raw_pixels/eval_<name>/     one evaluation of raw pixels
    results.json  study.png  table.md
"""

from dino_locat.launching.study.plan import BUDGETS, Budget, Piece, get_args_parser, plan_study
from dino_locat.launching.study.report import METRICS, StudyResults, read_results, render
from dino_locat.launching.study.run import run_study

__all__ = [
    "BUDGETS",
    "METRICS",
    "Budget",
    "Piece",
    "StudyResults",
    "get_args_parser",
    "plan_study",
    "read_results",
    "render",
    "run_study",
]
