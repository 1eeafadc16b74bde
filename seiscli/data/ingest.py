"""SEG-Y to MDIO v1 through multidimio's own importer (`mdio.segy_to_mdio`, template PostStack3DTime).

MDIO scans the trace headers for the inline/crossline grid, writes the trace mask (traces absent from the
file are dead), the coordinates, the amplitudes and `statsV1` (moments only; the loader then normalises
by mean and standard deviation). Inputs and outputs may be local paths or object-store URIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from seiscli.data.store import exists, is_remote, local_path, remove

Shape3 = tuple[int, int, int]
STANDARD_BYTES = {"inline": 189, "crossline": 193, "cdp_x": 181, "cdp_y": 185}  # SEG-Y rev 1 locations


@dataclass(frozen=True)
class Ingested:
    source: str
    uri: str


def destinations(sources: list[str], dest: str) -> list[str]:
    """One SEG-Y to DEST.mdio, or several into the folder/prefix DEST as <stem>.mdio."""
    if len(sources) == 1 and dest.rstrip("/").endswith(".mdio"):
        return [dest.rstrip("/")]
    stems = [s.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for s in sources]
    if len(set(stems)) != len(stems):
        raise ValueError(f"SEG-Y inputs share a file name ({', '.join(stems)}); ingest them into separate folders")
    return [f"{dest.rstrip('/')}/{stem}.mdio" for stem in stems]


def ingest_segy(
    source: str,
    dest: str,
    *,
    chunks: Shape3 | None = None,
    inline_byte: int = STANDARD_BYTES["inline"],
    crossline_byte: int = STANDARD_BYTES["crossline"],
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Ingested:
    from mdio import segy_to_mdio
    from mdio.builder.template_registry import get_template
    from segy.schema import HeaderField
    from segy.standards import get_segy_standard
    from upath import UPath

    if exists(dest, storage_options):
        if not overwrite:
            raise FileExistsError(f"{dest} already exists (pass overwrite to replace it)")
        remove(dest, storage_options)
    spec = get_segy_standard(1.0)
    if (inline_byte, crossline_byte) != (STANDARD_BYTES["inline"], STANDARD_BYTES["crossline"]):
        spec = spec.customize(
            trace_header_fields=[
                HeaderField(name="inline", byte=inline_byte, format="int32"),
                HeaderField(name="crossline", byte=crossline_byte, format="int32"),
            ]
        )
    template = get_template("PostStack3DTime")
    if chunks is not None:
        template.full_chunk_shape = chunks
    src = UPath(source, **(storage_options or {})) if is_remote(source) else UPath(local_path(source))
    out = UPath(dest, **(storage_options or {})) if is_remote(dest) else UPath(local_path(dest))
    segy_to_mdio(segy_spec=spec, mdio_template=template, input_path=src, output_path=out, overwrite=overwrite)
    return Ingested(source=source, uri=dest)
