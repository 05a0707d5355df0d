"""What a packager gets: the wheel carries the package, the command and the twistd plugin."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_the_twistd_plugin(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), ROOT],
        check=True, capture_output=True,
    )
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "twisted/plugins/leapmail_plugin.py" in names
    # Only our plugin modules: never an __init__.py that would shadow Twisted's package.
    assert sorted(n for n in names if n.startswith("twisted/")) == [
        "twisted/plugins/leapmail_plugin.py", "twisted/plugins/leapmail_provider_plugin.py"]
    assert "leapmail/store/store.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert b"leapmail = leapmail.cli:main" in zipfile.ZipFile(tmp_path / wheel).read(entry_points)
