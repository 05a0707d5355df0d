# The twistd plugin lives outside the package (twistd-plugins/twisted/plugins/, the
# layout Twisted documents) and installs into site-packages/twisted/plugins/, where
# twistd looks.  setup.cfg holds everything else.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["leapmail", "leapmail.*"]) + ["twisted.plugins"],
    package_dir={"twisted.plugins": "twistd-plugins/twisted/plugins"},
)
