"""CI: the built wheel is a platform wheel for this Python, and requires the TensorFlow its library was built against.

    python .ci/check_wheel.py dist/lrc_keras-*.whl     (after installing it, so that TensorFlow is installed)

Exits 1 with one line per problem.
"""

import importlib.metadata
import json
import os
import re
import sys
import sysconfig
import zipfile


def problems(path):
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    tag = os.path.basename(path)[:-len(".whl")].split("-", 2)[2]
    with zipfile.ZipFile(path) as wheel:
        info = next(name.split("/")[0] for name in wheel.namelist() if name.endswith(".dist-info/WHEEL"))
        headers = wheel.read(f"{info}/WHEEL").decode().splitlines()
        requirements = [line.split(":", 1)[1].strip() for line in wheel.read(f"{info}/METADATA").decode().splitlines()
                        if re.match(r"Requires-Dist: tensorflow(?![-\w])", line)]  # not tensorflow-datasets
        built_for = json.loads(wheel.read("lrc_keras/_lrc_ops.json")).get("tensorflow_version")
    installed = importlib.metadata.version("tensorflow")
    found = []
    if tag != f"{python}-{python}-{platform}":
        found.append(f"tag {tag}, expected {python}-{python}-{platform}")
    if "Root-Is-Purelib: false" not in headers:
        found.append(f"not a platform wheel: {[line for line in headers if line.startswith('Root-Is-Purelib')]}")
    if requirements != [f"tensorflow=={built_for}"]:
        found.append(f"requires {requirements}, but its library was built against TensorFlow {built_for}")
    if built_for != installed:
        found.append(f"its library was built against TensorFlow {built_for}, but {installed} is installed")
    return found


if __name__ == "__main__":
    found = problems(sys.argv[1])
    for problem in found:
        print(f"{sys.argv[1]}: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
