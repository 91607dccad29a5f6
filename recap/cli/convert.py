"""`recap convert`: checkpoints in other formats into folders `--model` loads.

`recap convert llava SRC --out DST [--vision-tower T]`: the original LLaVA repository's
format (the paper's own captioner, `tennant/llava-llama-3-8b-hqedit`) into transformers'
LLaVA, which both engines load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from recap.cli.base import app, command, say

convert_app = typer.Typer(help="Convert checkpoints into formats recap's engines load.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@command(convert_app, "llava")
def convert_llava(
    src: Annotated[str, typer.Argument(help="Original-format LLaVA checkpoint: a folder or a hub id.")],
    out: Annotated[Path, typer.Option("--out", help="New folder to write (absent or empty).")],
    vision_tower: Annotated[
        str | None,
        typer.Option(help="CLIP tower: a folder or a hub id (default: the checkpoint's mm_vision_tower)."),
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of SRC (default: main).")] = None,
) -> None:
    """Convert an original LLaVA-LLaMA checkpoint (model type llava_llama, mlp2x_gelu
    projector, CLIP tower) into a transformers LLaVA folder; tensors are copied unchanged."""
    # torch and transformers: only here, and only once the configs have been checked
    from workers.convert import convert_llava as convert

    done = convert(src, out, vision_tower=vision_tower, revision=revision)
    say(
        f"converted {src} (revision {done.source.revision}) with the vision tower {done.tower.name} "
        f"(revision {done.tower.revision}, weights from the {done.tower_weights}) into {done.out}: "
        f"{done.tensors} tensors copied unchanged; image token {done.image_token.text} "
        f"(id {done.image_token.id}, {done.image_token.how}), {done.image_features} per image"
    )
    mode = "pad" if done.aspect_ratio == "pad" else "crop"
    say(f"caption with: RECAP_IMAGE_MODE={mode} recap run INPUT... --out PATH --model {done.out}")
