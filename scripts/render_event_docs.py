"""Write the event contract, docs/asyncapi.yaml and docs/schemas/<Event>.json.

    .venv/bin/python scripts/render_event_docs.py            # write (make docs)
    .venv/bin/python scripts/render_event_docs.py --check    # are they up to date?

Both are built by ``pipeline_shared.event_docs`` from the event models and the
topology; this script only turns them into text. ``--check`` writes nothing and
exits 1 naming every file that is missing, different, or no longer generated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline_shared.event_docs import build_asyncapi, event_json_schemas

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ASYNCAPI_FILE = "asyncapi.yaml"
SCHEMAS_DIR = "schemas"


class _Dumper(yaml.SafeDumper):
    """Plain YAML: repeated values are written out, never as anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line prose reads best as a literal block.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_files() -> dict[str, str]:
    """Every generated file's text, by its path under docs/."""
    header = "# Generated from pipeline_shared.event_docs by `make docs`; do not edit.\n"
    asyncapi = yaml.dump(
        build_asyncapi(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )
    files = {ASYNCAPI_FILE: header + asyncapi}
    for name, schema in event_json_schemas().items():
        files[f"{SCHEMAS_DIR}/{name}.json"] = (
            json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
        )
    return files


def stale_files(docs: Path, files: dict[str, str]) -> dict[str, str]:
    """The files under ``docs`` that are not what ``files`` says, each with why."""
    stale: dict[str, str] = {}
    for path, text in files.items():
        if not (docs / path).is_file():
            stale[path] = "is missing"
        elif (docs / path).read_text(encoding="utf-8") != text:
            stale[path] = "is out of date"
    for orphan in sorted((docs / SCHEMAS_DIR).glob("*.json")):
        path = f"{SCHEMAS_DIR}/{orphan.name}"
        if path not in files:
            stale[path] = "belongs to no event"
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=DOCS, help="where to write (default docs/)")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; fail if a file is not up to date"
    )
    args = parser.parse_args(argv)
    docs: Path = args.docs
    files = render_files()
    stale = stale_files(docs, files)
    if args.check:
        for path, why in stale.items():
            print(f"{docs / path} {why}", file=sys.stderr)
        if stale:
            print("run: make docs", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        target = docs / path
        if path in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[path], encoding="utf-8")
            print(f"wrote {target}")
        else:
            target.unlink()
            print(f"removed {target}: no event has that name any more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
