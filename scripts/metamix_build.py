"""The metamix binary the scripts run: $METAMIX_BIN if set (an existing build, any
features), else a fresh release build in $CARGO_TARGET_DIR (or target/)."""
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent


def binary() -> pathlib.Path:
    if os.environ.get("METAMIX_BIN"):
        return pathlib.Path(os.environ["METAMIX_BIN"]).resolve()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/metamix"


def registry(binary: pathlib.Path) -> list:
    """The registered mixers' names, from `metamix mixers`."""
    import json

    out = subprocess.run([str(binary), "mixers"], check=True, capture_output=True, text=True).stdout
    return [json.loads(line)["name"] for line in out.splitlines()]
