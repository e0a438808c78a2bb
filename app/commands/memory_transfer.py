"""`reco memory export` and `reco memory import`: a version to and from clip-retrieval's layout with a manifest
(registered on the `memory` group by memory.py)."""

from __future__ import annotations

import click

from ..errors import RecoError
from .common import run_build


@click.command("export")
@click.argument("ref", metavar="NAME[@VERSION]")
@click.argument("directory")
@click.option("--part-rows", default=100_000, show_default=True, help="Items per part file.")
@click.pass_obj
def memory_export(rt, ref, directory, part_rows) -> None:
    """Write a version (default: the active one) to DIRECTORY in clip-retrieval's layout with a manifest."""
    from ..transfer.memory import export_version

    m = export_version(rt, ref, directory, part_rows=part_rows, progress=True)
    size = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"{m['memory']} v{m['version']}: {m['count']} items in {len(m['parts'])} part(s), "
               f"{size / 1024 ** 2:.1f} MB -> {directory}")


@click.command("import")
@click.argument("directory")
@click.option("--as", "name", default=None, help="Memory name (default: the exported one).")
@click.option("--backbone", default=None, help="This machine's spec of the same weights (default: the exported "
                                                "spec); its fingerprint must match the export's.")
@click.option("--activate", is_flag=True, help="Make the version active once it is ready and verified.")
@click.option("--quantization", type=click.Choice(["auto", "none", "int8", "binary"]), default=None,
              help="Storage options of the new version (default: the exported ones).")
@click.option("--on-disk/--in-ram", default=None)
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=float, default=None)
@click.pass_obj
def memory_import(rt, directory, name, backbone, activate, quantization, on_disk, wait, timeout) -> None:
    """Build a version from an export (either profile): hashes and backbone checked before anything is stored,
    verified at the end."""
    from ..memory import verify
    from ..store.base import Storage
    from ..transfer.memory import read_export, start_import

    manifest = read_export(directory)
    exported = manifest.get("storage", {})
    storage = Storage(quantization or exported.get("quantization", "auto"),
                      bool(exported.get("on_disk", False)) if on_disk is None else on_disk)
    name = name or manifest["memory"]
    v = start_import(rt, directory, manifest, name=name, backbone=backbone, activate=activate, storage=storage)
    click.echo(f"{name} v{v.version}: importing from {directory}", err=True)
    status = run_build(rt, name, v, wait, timeout)
    if status == "ready":
        report = verify(rt, name, v.version)
        if not report.ok:
            raise RecoError(f"{name} v{v.version} was imported but does not verify: {report.problems}")
        click.echo(f"{name} v{v.version} verified: {report.store_count} points")
