"""What an install gets: every package folder mapped and shipped (the migrations included), the image
built from the tested versions, dependency floors the tested versions satisfy, and URLs printed
without their passwords."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from lorabatch.schemas.settings import hide_password

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_folder_is_mapped():
    """A folder holding an __init__.py that pyproject does not map would be left out of the wheel."""
    mapped = {Path(folder) for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    packages = {init.parent.relative_to(REPO) for init in REPO.glob("*/**/__init__.py")
                if not any(p.startswith(".") or p in ("tests", "bench", "build") for p in init.relative_to(REPO).parts)}
    assert packages - mapped == set()
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == set(PYPROJECT["tool"]["setuptools"]["package-dir"])


def test_migrations_ship_with_the_package():
    """Alembic loads env.py and versions/*.py from the installed package folder, not from an alembic.ini."""
    from lorabatch.store import migrations

    assert (migrations.HERE / "env.py").is_file()
    assert sorted(p.name for p in (migrations.HERE / "versions").glob("0*.py"))[0] == "0001_round1.py"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["lorabatch.store.migrations.versions"] == "store/migrations/versions"
    assert migrations.head() == migrations.script_directory().get_current_head()


def test_dockerfile_installs_the_tested_versions_and_every_folder():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"pip install [^\n]*-c constraints\.txt", text)
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    top = {folder.split("/")[0] for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert top <= copied, top - copied


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_tested_versions_satisfy_the_floors():
    """Every pinned (tested) version is inside the ranges pyproject declares."""
    from packaging.requirements import Requirement

    pins = _pins()
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        reqs += extra
    checked = 0
    for spec in reqs:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{spec} excludes the tested {pins[name]}"
            checked += 1
    assert checked >= 10
    assert pins["torch"] and Requirement("torch>=2.5").specifier.contains(pins["torch"])


@pytest.mark.parametrize("url, secret", [
    ("postgresql+psycopg://bob:pXq@ssJ:wKw@rdZ@db.example:5432/lb", "pXq@ssJ:wKw@rdZ"),
    ("redis://:s3cQ@tYY:xVx@redis:6379/0", "s3cQ@tYY:xVx"),
    ("redis://user:aaQ/bbW@ccE@host:6379/0", "aaQ/bbW@ccE"),
    ("postgresql://bob:hunter2@h/db?sslmode=require&password=hunter3", "hunter"),
])
def test_passwords_with_at_and_colon_are_fully_hidden(url, secret):
    shown = hide_password(url)
    assert "***" in shown
    for piece in {secret, *re.split(r"[@:/]", secret)}:  # no piece of the password either
        assert piece not in shown, shown
    assert shown.split("***@")[-1] == url.rpartition("@")[2].split("&password=")[0] + (
        "&password=***" if "password=" in url else "")


def test_urls_without_passwords_and_messages_keep_their_text():
    assert hide_password("redis+socket:///tmp/x/redis.sock") == "redis+socket:///tmp/x/redis.sock"
    assert hide_password("sqlite:////tmp/a@b.db") == "sqlite:////tmp/a@b.db"
    assert hide_password(None) == "(embedded)"
    msg = "cannot reach the database at postgresql://u:p@ss@h:5432/x (OperationalError); start it"
    assert hide_password(msg) == "cannot reach the database at postgresql://u:***@h:5432/x (OperationalError); start it"


def test_head_constant_is_the_newest_revision():
    """store.migrations.HEAD (read without importing Alembic) names the newest file in versions/."""
    from lorabatch.store import migrations

    assert migrations.HEAD == migrations.script_directory().get_current_head()
