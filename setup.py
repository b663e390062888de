"""Maps the top-level folders onto the ``maskfl`` import namespace.

``protocol/`` installs as ``maskfl.protocol``, ``agent/`` as ``maskfl.agent`` and so
on, so nothing generic lands in site-packages. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

TOP_LEVEL = (
    "protocol",
    "transport",
    "agent",
    "broker_coordinator",
    "aggregator_gpu",
    "testing",
    "tools",
    "models",
)

packages = []
package_dir = {}
for top in TOP_LEVEL:
    package_dir[f"maskfl.{top}"] = top
    packages += [f"maskfl.{name}" for name in find_packages(include=[top, f"{top}.*"])]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "": ["py.typed", "*.tflite", "*.json", "*.npy", "*.npz"],
        # The status page and its vendored charting library (uPlot, MIT, with its licence).
        "maskfl.broker_coordinator": ["web/*.html", "web/*.js", "web/*.css", "web/vendor/*"],
    },
)
