"""The study command end to end, on a tiny budget (marked slow: about 2 minutes)."""

import pytest

from glo_search.study import EXPERIMENTS, MEASURES_FILE, Plan, run_study
from glo_search.study_report import FINDINGS_FILE, REPORT_FILE, write_outputs

TINY = Plan("tiny", (0, 1), 120, 1, 2, 20)


@pytest.mark.slow
def test_study_writes_findings_and_report(ray_session, tmp_path):
    experiments = tuple(e for e in EXPERIMENTS if e.name in ("loss", "noise_std"))
    folders = run_study(tmp_path, TINY, experiments)
    assert set(folders) == {"loss", "noise_std"}
    for folder in folders.values():
        assert (folder / MEASURES_FILE).is_file()

    findings, report = write_outputs(folders, tmp_path, TINY, 1.0, "test")
    text = findings.read_text()
    assert findings.name == FINDINGS_FILE
    assert "## Verdicts" in text
    for title in ("1. Pixel loss misleads", "2. L1 and L2 differ", "5. High noise ignores"):
        assert title in text
    page = report.read_text()
    assert report.name == REPORT_FILE
    assert page.count('<img alt="loss = ') == 3
    assert page.count('<img alt="noise_std = ') == 5
    assert (tmp_path / "report" / "report.html").is_file()


@pytest.mark.slow
def test_study_skips_finished_experiments(ray_session, tmp_path):
    experiments = tuple(e for e in EXPERIMENTS if e.name == "loss")
    run_study(tmp_path, TINY, experiments)
    stamp = (tmp_path / "loss" / "trials.parquet").stat().st_mtime_ns
    run_study(tmp_path, TINY, experiments)
    assert (tmp_path / "loss" / "trials.parquet").stat().st_mtime_ns == stamp
