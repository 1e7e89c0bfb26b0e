"""Post-hoc analysis of glo-search experiment folders; needs no running Ray.

``load(path)`` returns the trials and epochs tables as pandas DataFrames; the functions in
``analysis.tables`` and ``analysis.plots`` compute each table and figure of the report,
and ``analyze(paths, out)`` writes the whole report (``glo-search analyze`` on the command
line).
"""

from analysis.experiment import (
    AnalysisError,
    Experiment,
    load,
    load_experiment,
    load_experiments,
    load_study,
)
from analysis.report import analyze

__all__ = [
    "AnalysisError",
    "Experiment",
    "analyze",
    "load",
    "load_experiment",
    "load_experiments",
    "load_study",
]
