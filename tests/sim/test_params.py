"""SimParams: every cost named, with a unit; JSON round trip; bad input in one line."""

import json

import pytest

from vscsi.sim.params import SimParams, docs


def test_every_parameter_has_a_unit_and_a_reason():
    for name, default, unit, why in docs():
        assert unit and len(why) > 20, name
        assert default >= 0


def test_json_round_trip(tmp_path):
    p = SimParams().with_(submit_us=3.5, host_cpus=4)
    path = tmp_path / "p.json"
    p.save(path, {"_derived": ["a note"]})
    assert SimParams.load(path) == p
    assert json.loads(path.read_text())["_derived"] == ["a note"]


def test_a_partial_file_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"kick_us": 1}')
    assert SimParams.load(path) == SimParams().with_(kick_us=1.0)


@pytest.mark.parametrize("text, message", [
    ('{"nope": 1}', "unknown parameter"),
    ('{"kick_us": -1}', "must be a number >= 0"),
    ('[1, 2]', "one JSON object"),
    ('{', "not JSON"),
    ('{"host_cpus": 0}', "at least 1"),
])
def test_bad_params_files(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        SimParams.load(path)


def test_the_readme_documents_every_parameter():
    from pathlib import Path

    import vscsi.sim

    text = (Path(vscsi.sim.__file__).parent / "README.md").read_text()
    for name, *_ in docs():
        assert f"`{name}`" in text, name
