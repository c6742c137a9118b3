"""What every benchmark does last: write its figures as JSON."""

import json
import os

DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_path(name: str) -> str:
    """benchmarks/results/NAME.json"""
    return os.path.join(DIRECTORY, f"{name}.json")


def write(results: dict, path: str) -> None:
    """Writes `results` to `path` (creating its folder) and says where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {path}")
