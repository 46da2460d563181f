"""bench/run_all.py: rebuilding RESULTS.md from the sections."""
from bench import run_all


def test_a_rebuild_keeps_the_machine_the_tables_were_measured_on(tmp_path, monkeypatch):
    """--run=False only re-joins the sections: it relabelled every table measured on the EPYC with the machine
    the rebuild happened to run on."""
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "train.md").write_text("## Stage 1\n\n| a | 1 |\n")
    results = tmp_path / "bench" / "RESULTS.md"
    results.write_text("# Benchmark results\n\nMachine: the machine of the last run.\n\nold tables\n")
    run_all.main(run=False)
    text = results.read_text()
    assert "Machine: the machine of the last run." in text.splitlines()
    assert "## Stage 1" in text and "old tables" not in text
    results.unlink()                      # nothing to keep: the machine it runs on
    run_all.main(run=False)
    assert f"Machine: {run_all.machine()}." in results.read_text().splitlines()
