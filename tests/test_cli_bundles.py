"""`twinstream stack up` right after set-up: the base bundle is built first, another missing
bundle stops before anything starts with the command that makes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from twinstream.cli import main
from twinstream.devstack import prepare_bundles


def fake_build(built: list[Path]) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        built.append(path)
        path.mkdir(parents=True)
        (path / "manifest.json").write_text("{}")
    return build


def test_the_missing_default_bundle_is_built_once(tmp_path: Path) -> None:
    default, built = tmp_path / "models" / "base" / "1", list[Path]()
    prepare_bundles([default], default, fake_build(built))
    prepare_bundles([default], default, fake_build(built))
    assert built == [default]


def test_another_missing_bundle_names_the_command_that_makes_it(tmp_path: Path) -> None:
    built: list[Path] = []
    with pytest.raises(SystemExit, match=r"twinstream base-bundle --out .*mine"):
        prepare_bundles([tmp_path / "mine"], tmp_path / "base", fake_build(built))
    assert built == []


def test_stack_up_stops_before_starting_anything_without_its_bundle(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no model bundle at"):
        main(["stack", "up", "--bundle", str(tmp_path / "missing")])
