"""Stars and notes: saved per SAE, never lost to a second UI writing at the same time, and a damaged
file is reported and kept aside instead of being overwritten."""

from __future__ import annotations

import json
import subprocess
import sys

from epo_tui import paths
from epo_tui.stars import Stars, stars_path


def test_stars_and_notes_round_trip(tmp_path):
    path = tmp_path / "stars.json"
    stars = Stars.load("gpt2|res-6", path)
    assert stars.problem is None and stars.starred() == set()
    assert stars.toggle_star(12) is True
    assert stars.toggle_star(40) is True
    assert stars.toggle_star(40) is False
    stars.set_note(7, "  fires on French  ")

    again = Stars.load("gpt2|res-6", path)
    assert again.starred() == {12} and again.is_starred(12) and not again.is_starred(40)
    assert again.note(7) == "fires on French" and again.note(12) == "" and again.noted() == {7}
    assert Stars.load("other-sae", path).starred() == set()  # indices belong to one SAE
    data = json.loads(path.read_text())
    assert data == {"version": 1, "saes": {"gpt2|res-6": {"12": {"star": True, "note": ""},
                                                          "7": {"star": False, "note": "fires on French"}}}}
    again.set_note(7, "")  # nothing left to keep: the feature leaves the file
    assert "7" not in json.loads(path.read_text())["saes"]["gpt2|res-6"]


def test_default_path_is_in_the_data_folder():
    assert stars_path() == paths.data_dir() / "stars.json"
    assert Stars.load("k").path == stars_path()


def test_a_change_keeps_what_another_process_wrote_meanwhile(tmp_path):
    path = tmp_path / "stars.json"
    first, second = Stars.load("sae", path), Stars.load("sae", path)
    first.toggle_star(1)
    second.toggle_star(2)  # second never saw 1: it re-reads before writing
    assert Stars.load("sae", path).starred() == {1, 2}
    assert second.starred() == {1, 2}


def test_two_processes_toggling_at_once_lose_nothing(tmp_path):
    path = tmp_path / "stars.json"
    code = ("import sys\nfrom epo_tui.stars import Stars\n"
            "stars = Stars.load('sae', sys.argv[1])\n"
            "start = int(sys.argv[2])\n"
            "for i in range(start, start + 50):\n"
            "    stars.toggle_star(i)\n"
            "    stars.set_note(i, f'note {i}')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(start)]) for start in (0, 1000)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    stars = Stars.load("sae", path)
    expected = set(range(50)) | set(range(1000, 1050))
    assert stars.starred() == expected
    assert all(stars.note(i) == f"note {i}" for i in expected)


def test_a_damaged_file_is_reported_and_kept_aside(tmp_path):
    path = tmp_path / "stars.json"
    path.write_text('{"version": 1, "saes": {"sae": {"3": {"star": tr')
    stars = Stars.load("sae", path)
    assert stars.problem and "damaged" in stars.problem and "\n" not in stars.problem
    assert stars.starred() == set()
    assert path.read_text().endswith("tr")  # only reading: nothing is touched yet

    stars.toggle_star(5)
    kept = list(tmp_path.glob("stars.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text().endswith("tr")
    assert Stars.load("sae", path).starred() == {5} and Stars.load("sae", path).problem is None


def test_a_file_of_another_shape_is_kept_aside_too(tmp_path):
    path = tmp_path / "stars.json"
    path.write_text('["not", "stars"]')
    stars = Stars.load("sae", path)
    assert stars.problem and "not a version-1 stars file" in stars.problem
    stars.set_note(1, "x")
    assert [p.read_text() for p in tmp_path.glob("stars.json.corrupt-*")] == ['["not", "stars"]']
