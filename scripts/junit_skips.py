"""Prints one line per skipped test case in a pytest JUnit XML report (nothing when none was):

    python3 scripts/junit_skips.py REPORT.xml

.ci/run and scripts/pymatrix.sh fail a run as root that printed anything: there, every
root/BPF test must run."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    skipped = case.find("skipped")
    if skipped is not None:
        print(f"{case.get('classname')}.{case.get('name')}: {skipped.get('message')}")
