"""The benchmarks behind BENCHMARKS.md run at a tiny size, so they cannot rot."""

import json


def test_open_speed_runs_and_open_reads_less_than_load(tmp_path, capsys):
    from benchmarks.open_speed import main

    assert main(["--tags", "2000", "--layers", "4", "--dim", "2048", "--dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["open"]["shape"] == result["load"]["shape"]
    assert result["open"]["peak_rss_mib"] + 30 < result["load"]["peak_rss_mib"]  # a 31 MiB file: load holds it twice
    opened, loaded = result["extract via open"], result["extract via load"]
    assert opened["out_kib"] == loaded["out_kib"] and opened["peak_rss_mib"] + 30 < loaded["peak_rss_mib"]
    streamed, whole = result["drop via open"], result["drop via load"]
    assert streamed["out_gib"] == whole["out_gib"] and streamed["peak_rss_mib"] + 30 < whole["peak_rss_mib"]
    assert not list(tmp_path.iterdir()), "the synthetic table is removed"


def test_gpu_benchmark_runs_at_a_tiny_size_on_cpu(tmp_path):
    from benchmarks.gpu import main

    out = tmp_path / "gpu.md"
    assert main(["--size", "tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--distill-batch", "2",
                 "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| sd")]
    assert len(rows) == 14  # 7 measurements × (SD1.5, SDXL)
    assert sum("distillation step (batch 2;" in row and "h per 1,000 tags" in row for row in rows) == 2
    for row in rows:
        seconds = float(row.split("|")[3])
        assert seconds > 0, row
    assert any("LoRA step (rank 4" in row for row in rows)


def test_disk_training_benchmark_runs_at_a_tiny_size(tmp_path, capsys):
    from benchmarks.disk_train import main

    assert main(["--family", "sd15", "--tags", "3000", "--steps", "2", "--dir", str(tmp_path)]) == 0
    (result,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train = result["train"]
    assert train["steps"] == 2 and 0 < train["held_rows"] < 50  # the batch's rows and one new tag, not 3,000
    assert abs(train["exported_gib"] - result["table_gib"]) < 0.01 and train["peak_rss_gib"] > 0
    assert result["open_trained"]["cond_shape"] == [1, 77, 768]
    assert not list(tmp_path.iterdir()), "the tables and runs are removed"


def test_step_ratios_repeat_until_the_spreads_separate_or_are_shown_to_overlap():
    from benchmarks import speed

    assert speed.separated([1.0, 1.1, 1.2, 1.3], [2.0, 2.1, 2.2, 2.3])
    assert not speed.separated([1.0, 1.5, 2.0, 2.5], [1.4, 1.6, 1.8, 3.0])
    calls = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    clock = iter(range(10_000))
    real = speed.time.perf_counter
    speed.time.perf_counter = lambda: next(clock) * 1e-3  # every call 1 ms: the two sides always overlap
    try:
        times, verdict = speed.until_separated(cases, repeats=3, warmup=0, max_repeats=9)
    finally:
        speed.time.perf_counter = real
    assert len(times["a"]) == len(times["b"]) == 9 and "overlap after 9 rounds" in verdict
    assert calls.count("a") == calls.count("b") == 9


def test_concept_pair_scores_both_concepts_and_nothing_less():
    from benchmarks.concept_pair import both_right
    from demo.data import render

    mascot = {"shape": "circle", "colour": "magenta", "size": "large", "position": "left"}
    badge = {"shape": "square", "colour": "cyan", "size": "small", "position": "right"}
    assert both_right(render({"background": "white", "objects": [mascot, badge]}))
    assert both_right(render({"background": "white", "objects": [dict(badge, position="left"),
                                                                 dict(mascot, position="right")]}))
    assert not both_right(render({"background": "white", "objects": [mascot]}))
    assert not both_right(render({"background": "white", "objects": [mascot, dict(badge, colour="red")]}))
    assert not both_right(render({"background": "black", "objects": [mascot, badge]}))
    assert not both_right(render({"background": "white", "objects": [mascot, dict(mascot, position="right",
                                                                                     size="small")]}))
