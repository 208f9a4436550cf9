import json
import math
from importlib import metadata

import pytest
import torch

from gradient_bottleneck.results import ResultsRecorder, atomic_write_bytes, write_json


def test_write_json_round_trips_tensors_and_nonfinite(tmp_path):
    path = write_json(tmp_path / "out.json", {"t": torch.tensor([1.0, 2.0]), "nan": math.nan, "p": tmp_path})
    data = json.loads(path.read_text())
    assert data == {"t": [1.0, 2.0], "nan": "nan", "p": str(tmp_path)}


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"value": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"value": Unserialisable()})
    assert json.loads(path.read_text()) == {"value": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_unwritable_folder_names_the_folder(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(OSError, match="not_a_folder.*writable output folder"):
        atomic_write_bytes(blocker / "results.json", b"{}")


def test_recorder_separates_timing_from_values(tmp_path):
    recorder = ResultsRecorder(tmp_path / "r.json", parameters={"width": 8}, seed=3, device="cpu")
    recorder.record(ratio=0.9)
    recorder.add_verdict("claim", "0.95", "0.9", "partial", "smoke")
    data = json.loads(recorder.write().read_text())
    assert data["values"] == {"ratio": 0.9}
    assert data["provenance"]["parameters"] == {"width": 8}
    assert data["provenance"]["seed"] == 3
    assert data["provenance"]["versions"]["torch"] == metadata.version("torch")
    assert set(data["timing"]) == {"started_utc", "finished_utc", "wall_time_s"}
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        recorder.add_verdict("claim", "x", "y", "maybe", "smoke")


def test_recorder_keeps_extra_wall_times_under_timing(tmp_path):
    recorder = ResultsRecorder(tmp_path / "r.json", parameters={}, seed=0, device="cpu")
    recorder.record(ratio=0.9)
    recorder.record_timing(grid_s=12.5, run_wall_times_s=[1.0, 2.0])
    data = json.loads(recorder.write().read_text())
    assert data["values"] == {"ratio": 0.9}
    assert data["timing"]["grid_s"] == 12.5
    assert data["timing"]["run_wall_times_s"] == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"timing keys \['wall_time_s'\] are written by the recorder"):
        recorder.record_timing(wall_time_s=3.0)


def test_written_files_get_default_permissions(tmp_path):
    path = write_json(tmp_path / "shared.json", {"value": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
