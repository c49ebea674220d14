"""``python -m conformance.ci COMMAND [options]``: the CI steps; ``COMMAND --help`` lists options."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .log import CIError, log
from .matrix import CELLS, ROOT, versions_table
from .options import parse


def _list(opts) -> int:  # noqa: ANN001 - argparse.Namespace
    cells = [c for c in CELLS if opts.tag is None or opts.tag in c.tags]
    if not cells:
        raise CIError(f"no cell has tag {opts.tag!r}")
    if opts.json:
        print(json.dumps([c.to_json() for c in cells], indent=2))
    else:
        lines = versions_table().splitlines()
        keep = {f"`{c.id}`" for c in cells}
        print("\n".join(lines[:2] + [ln for ln in lines[2:] if ln.split(" | ")[0].lstrip("| ") in keep]))
    return 0


def _matrix_report(opts) -> int:  # noqa: ANN001
    from .matrix_report import join, markdown

    root = Path(opts.root)
    cells = None if opts.tag is None else [c for c in CELLS if opts.tag in c.tags]
    if cells == []:
        raise CIError(f"no cell has tag {opts.tag!r}")
    doc = join(root, cells)
    if not doc["cells"]:
        raise CIError(f"no cell reports under {root}" + (f" with tag {opts.tag}" if opts.tag else "")
                      + ": run `nox -t bnb-axis` (or one matrix cell) first")
    js, md = root / "matrix.json", root / "matrix.md"
    js.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    md.write_text(markdown(doc), encoding="utf-8")
    log(f"wrote {js} and {md}")
    print(md.read_text(encoding="utf-8"), end="")
    if opts.save:
        dest = ROOT / "baselines" / "matrix"
        dest.mkdir(parents=True, exist_ok=True)
        for src in (js, md):
            shutil.copyfile(src, dest / f"{opts.save}{src.suffix}")
        log(f"saved {dest / opts.save}.json and .md")
        if opts.joined:
            _joined_write(dest)
    return 0


def _joined_write(directory: Path) -> None:
    from .joined import write

    changed = write(directory)
    log(f"joined every stored axis: {', '.join(str(p) for p in changed) or 'unchanged'}")


def _joined(opts) -> int:  # noqa: ANN001
    from .joined import DIRECTORY, write

    directory = Path(opts.dir) if opts.dir else DIRECTORY
    if not opts.check:
        _joined_write(directory)
        return 0
    stale = write(directory, check=True)
    for p in stale:
        print(f"{p}: not what the stored axis tables give; run `python -m conformance.ci joined`", file=sys.stderr)
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    opts, rest = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        if opts.cmd in ("tests", "report", "lint", "bench", "compare", "stateful"):
            from . import sessions

            return getattr(sessions, opts.cmd)(opts, rest)
        if opts.cmd in ("impl", "compare_impls"):
            from . import impls

            return getattr(impls, opts.cmd)(opts, rest)
        if opts.cmd == "gpu":
            from . import gpu

            return gpu.main(opts)
        if opts.cmd == "matrix":
            from . import cell

            return cell.main(opts)
        if opts.cmd == "regress":
            from . import regress

            return regress.main(opts)
        if opts.cmd == "matrix_report":
            return _matrix_report(opts)
        if opts.cmd == "joined":
            return _joined(opts)
        return _list(opts)
    except CIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
