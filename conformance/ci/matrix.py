"""The version matrix: one table of cells, each named by all its pins. Standard library only.

Each cell is one environment (``.nox/matrix-<cell.id>``, reused across runs: see
:mod:`conformance.ci.envs`) with the cell's pins::

    torch==<torch>  bitsandbytes==<bnb>  peft==<peft>  transformers==<transformers>
    accelerate==<accelerate>  [huggingface_hub==<hub>: transformers 4.x cells]

in which ``python -m conformance run`` checks the cell's implementations and (for the bnb and
torch axes) the clone probe runs; outputs go to ``reports/matrix/<cell.id>/`` and
:mod:`conformance.ci.matrix_report` joins them into one table.

Three axes:

* **bnb axis** (tag ``bnb-axis``): bitsandbytes releases with the pinned CPU torch (:data:`CPU_TORCH`,
  read from ``constraints/cpu.txt``, the one place it is written). Runs on a CPU-only machine:
  bitsandbytes >= 0.48 ships the CPU backend for 4-bit and 8-bit.
* **torch axis** (tag ``torch-axis``): other torch releases, each with the bitsandbytes and the PEFT /
  transformers / accelerate of its time (:data:`COMPANIONS`: old PEFT needs old transformers). GPU
  CI cells: PyPI's Linux torch wheels are CUDA builds.
* **PEFT axis** (tag ``peft-axis``): PEFT releases with the transformers / accelerate of their time on
  the CPU torch and the newest bitsandbytes; only ``--impl peft`` runs (the reference does not
  depend on PEFT, and torch, hence the clone probe's answer, is the same in every one of them).

``python -m conformance.ci list`` prints the table; nox sessions ``matrix(<cell.id>)`` run one cell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CPU_CONSTRAINTS = ROOT / "constraints" / "cpu.txt"


def read_cpu_torch(path: Path = CPU_CONSTRAINTS) -> str:
    """The torch version pinned in ``constraints/cpu.txt`` (its ``torch==X`` line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuntimeError(f"cannot read the CPU torch pin {path}: {exc} (run from a checkout)") from None
    found = re.findall(r"^\s*torch\s*==\s*([0-9][0-9A-Za-z.+]*)\s*(?:#.*)?$", text, re.M)
    if len(found) != 1:
        raise RuntimeError(f"{path} must pin torch exactly once as `torch==X.Y.Z`; found {found or 'none'}")
    return found[0]


#: The torch of the CPU build pinned in ``constraints/cpu.txt`` (read from there, written nowhere else).
CPU_TORCH = read_cpu_torch()

#: transformers 4.x is used with this huggingface_hub (hub 1.x dropped APIs transformers 4 calls).
HUB_FOR_TRANSFORMERS_4 = "0.36.2"


@dataclass(frozen=True)
class Companions:
    """Versions installed next to a torch release: what was current when that torch came out.

    ``bnb`` is the bitsandbytes of that torch's torch-axis cell."""

    peft: str
    transformers: str
    accelerate: str
    bnb: str
    note: str = ""


#: torch release -> its companions. Release dates from PyPI (upload times) so the set is one that
#: users actually had: e.g. torch 2.11.0 (2026-03-23) with PEFT 0.19.1 (2026-04-16) and
#: transformers 5.5.4 (2026-04-13). torch 2.6.0 is the "old stack" cell: PEFT 0.15 (no OFT on
#: bitsandbytes, LoRA keyword signature) needs transformers 4.x.
COMPANIONS: dict[str, Companions] = {
    "2.6.0": Companions(peft="0.15.2", transformers="4.51.3", accelerate="1.6.0", bnb="0.45.5",
                        note="old stack: PEFT 0.15 (no OFT on bnb), transformers 4.x"),
    "2.11.0": Companions(peft="0.19.1", transformers="5.5.4", accelerate="1.13.0", bnb="0.49.2"),
    "2.12.0": Companions(peft="0.19.1", transformers="5.10.4", accelerate="1.14.0", bnb="0.49.2"),
    "2.13.0": Companions(peft="0.21.2", transformers="5.23.0", accelerate="1.15.0", bnb="0.50.2",
                         note="the local CPU build (constraints/cpu.txt)"),
    "2.14.1": Companions(peft="0.21.2", transformers="5.23.0", accelerate="1.15.0", bnb="0.50.2",
                         note="between 2.13.0 and 2.15.0 with their companions: only torch changes along the axis"),
    "2.15.0": Companions(peft="0.21.2", transformers="5.23.0", accelerate="1.15.0", bnb="0.50.2",
                         note="newest torch: the cell that answers 'is the clone still needed?'"),
}

#: bitsandbytes releases of the bnb axis (latest patch of each minor that has the CPU backend).
BNB_AXIS: tuple[str, ...] = ("0.48.2", "0.49.2", "0.50.2")
#: torch releases of the torch axis (each with COMPANIONS[torch]).
TORCH_AXIS: tuple[str, ...] = ("2.6.0", "2.11.0", "2.12.0", "2.13.0", "2.14.1", "2.15.0")
#: PEFT releases of the PEFT axis: (peft, transformers, accelerate), on CPU_TORCH and
#: COMPANIONS[CPU_TORCH].bnb. The last row is the current stack (the bnb axis' newest cell).
PEFT_AXIS: tuple[tuple[str, str, str], ...] = (
    ("0.16.0", "4.53.3", "1.8.1"),
    ("0.17.1", "4.55.4", "1.10.0"),
    ("0.18.1", "4.57.6", "1.12.0"),
    ("0.19.1", "5.5.4", "1.13.0"),
    ("0.20.0", "5.14.1", "1.14.0"),
    (COMPANIONS[CPU_TORCH].peft, COMPANIONS[CPU_TORCH].transformers, COMPANIONS[CPU_TORCH].accelerate),
)

#: what a cell runs: the full check (bnb and torch axes) or PEFT only (a PEFT-axis-only cell)
FULL_IMPLS = ("reference", "peft")
PEFT_ONLY = ("peft",)


def hub_for(transformers: str) -> str | None:
    """The huggingface_hub pin a transformers release needs (None: whatever pip resolves)."""
    return HUB_FOR_TRANSFORMERS_4 if transformers.split(".")[0] == "4" else None


@dataclass(frozen=True)
class Cell:
    """One environment of the matrix, named by all its pins."""

    torch: str
    bnb: str
    peft: str
    transformers: str
    accelerate: str
    tags: tuple[str, ...] = field(default=(), compare=False)
    impls: tuple[str, ...] = field(default=FULL_IMPLS, compare=False)
    probe: bool = field(default=True, compare=False)

    @property
    def hub(self) -> str | None:
        return hub_for(self.transformers)

    @property
    def id(self) -> str:
        """Directory, environment and session name: every pin, e.g.
        ``torch2.13.0-bnb0.50.2-peft0.18.1-transformers4.57.6-accelerate1.12.0-hub0.36.2``."""
        base = (f"torch{self.torch}-bnb{self.bnb}-peft{self.peft}-transformers{self.transformers}"
                f"-accelerate{self.accelerate}")
        return base + (f"-hub{self.hub}" if self.hub else "")

    @property
    def session(self) -> str:
        """The nox session name (what ``nox -s`` takes)."""
        return f"matrix({self.id})"

    @property
    def needs_gpu(self) -> bool:
        """Any torch but the pinned CPU build is a CUDA wheel from PyPI: a GPU CI cell."""
        return self.torch != CPU_TORCH

    @property
    def cpu_runnable(self) -> bool:
        """Whether ``--device cpu`` can run it here: its bitsandbytes has the CPU backend (>= 0.48); a CUDA torch
        wheel runs on a CPU too (a multi-GB install; the report labels it "CUDA build, no GPU")."""
        return tuple(int(v) for v in self.bnb.split(".")[:2]) >= (0, 48)

    @property
    def files(self) -> tuple[str, ...]:
        """What a finished run of this cell leaves in its directory."""
        return ("cell.json", "conformance.json") + (("clone.json",) if self.probe else ())

    def pins(self) -> list[str]:
        """pip requirement pins of this cell."""
        pins = [f"torch=={self.torch}", f"bitsandbytes=={self.bnb}", f"peft=={self.peft}",
                f"transformers=={self.transformers}", f"accelerate=={self.accelerate}"]
        return pins + ([f"huggingface-hub=={self.hub}"] if self.hub else [])

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "session": self.session, "torch": self.torch, "bnb": self.bnb, "peft": self.peft,
                "transformers": self.transformers, "accelerate": self.accelerate, "huggingface_hub": self.hub,
                "tags": list(self.tags), "needs_gpu": self.needs_gpu, "impls": list(self.impls),
                "probe": self.probe, "pins": self.pins()}


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split("."))


def _build_cells() -> tuple[Cell, ...]:
    axes: dict[tuple[str, ...], list[str]] = {}
    cpu = COMPANIONS[CPU_TORCH]
    for b in BNB_AXIS:
        axes.setdefault((CPU_TORCH, b, cpu.peft, cpu.transformers, cpu.accelerate), []).append("bnb-axis")
    for t in TORCH_AXIS:
        k = COMPANIONS[t]
        axes.setdefault((t, k.bnb, k.peft, k.transformers, k.accelerate), []).append("torch-axis")
    for p, tf, acc in PEFT_AXIS:
        axes.setdefault((CPU_TORCH, cpu.bnb, p, tf, acc), []).append("peft-axis")
    cells = []
    for pins, names in axes.items():
        t, b, p = pins[:3]
        full = names != ["peft-axis"]
        tags = (*names, "gpu-cell" if t != CPU_TORCH else "cpu-cell", f"torch-{t}", f"bnb-{b}", f"peft-{p}")
        cells.append(Cell(*pins, tags=tags, impls=FULL_IMPLS if full else PEFT_ONLY, probe=full))
    return tuple(sorted(cells, key=lambda c: (_vkey(c.torch), _vkey(c.bnb), _vkey(c.peft))))


#: Every cell, sorted by (torch, bnb, peft). The noxfile's ``matrix`` session is parametrized from this.
CELLS: tuple[Cell, ...] = _build_cells()


def cell(cell_id: str) -> Cell:
    """The cell named ``cell_id`` (its :attr:`Cell.id`); KeyError naming every cell otherwise."""
    for c in CELLS:
        if c.id == cell_id:
            return c
    raise KeyError(f"no matrix cell {cell_id!r}; cells: {', '.join(c.id for c in CELLS)}")


def torch_cell(torch: str) -> Cell | None:
    """The torch-axis cell of a torch release (its bitsandbytes and companions), if the table has one."""
    return next((c for c in CELLS if c.torch == torch and "torch-axis" in c.tags), None)


def versions_table() -> str:
    """The matrix as a Markdown table (cells, pins, what runs, tags)."""
    rows = ["| cell | torch | bitsandbytes | peft | transformers | accelerate | hub | runs on | checks | tags |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in CELLS:
        checks = " + ".join(c.impls) + (" + clone probe" if c.probe else "")
        rows.append(f"| `{c.id}` | {c.torch} | {c.bnb} | {c.peft} | {c.transformers} | {c.accelerate} | "
                    f"{c.hub or '-'} | {'GPU CI' if c.needs_gpu else 'CPU'} | {checks} | {', '.join(c.tags)} |")
    return "\n".join(rows) + "\n"
